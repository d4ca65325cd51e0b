"""Single-stream speed with and without speculative decoding, on a repetitive prompt set (code
and text to copy back, where prompt lookup proposes well) and a free one (nothing to copy):

    .venv/bin/python benchmarks/speculative.py                  # starts a server: smollm2-vllm vs smollm2-vllm-ngram
    .venv/bin/python benchmarks/speculative.py --url URL --pairs BASE:SPECULATIVE ...

Each alias answers every prompt of a set once to warm up, then --rounds times at concurrency 1,
greedy, --tokens tokens; tok/s is completion tokens over the requests' wall time. The acceptance
rate is the speculative alias's accepted / proposed tokens over the timed requests (/metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.chat_client import chat, serving, write  # noqa: E402

CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return a * b\n"
SETS = {
    "repetitive": [f"Repeat this code exactly:\n{CODE}",
                   "Copy this list exactly: apples, pears, plums, apples, pears, plums, apples, pears, plums.",
                   f"Rewrite this code with the same names:\n{CODE}"],
    "free": ["Write a haiku about the sea.", "Tell me a short story about a cat.", "Why is the sky blue?"],
}


def metric(url: str, name: str, model: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            total += float(line.rpartition(" ")[2])
    return total


async def measure(url: str, alias: str, prompts: list[str], rounds: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for p in prompts:
            await chat(client, alias, "You are a helpful assistant.", p, tokens)
        drafted = metric(url, "llm_speculative_draft_tokens_total", alias)
        accepted = metric(url, "llm_speculative_accepted_tokens_total", alias)
        done, start = 0, time.perf_counter()
        for _ in range(rounds):
            for p in prompts:
                done += (await chat(client, alias, "You are a helpful assistant.", p, tokens))["completion"]
        wall = time.perf_counter() - start
    await asyncio.sleep(1.5)  # vLLM hands its step statistics over a little after the tokens
    drafted = metric(url, "llm_speculative_draft_tokens_total", alias) - drafted
    accepted = metric(url, "llm_speculative_accepted_tokens_total", alias) - accepted
    return {"alias": alias, "tokens": done, "tok_s": done / wall,
            "acceptance": accepted / drafted if drafted else None, "drafted": drafted}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url")
    p.add_argument("--pairs", nargs="+", default=["smollm2-vllm:smollm2-vllm-ngram"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = []
    with serving(args.url) as url:
        for pair in args.pairs:
            base, spec = pair.split(":")
            for alias in (base, spec):
                httpx.post(f"{url}/models/{alias}/load", timeout=600).raise_for_status()
            for name, prompts in SETS.items():
                without = asyncio.run(measure(url, base, prompts, args.rounds, args.tokens))
                with_ = asyncio.run(measure(url, spec, prompts, args.rounds, args.tokens))
                rows.append({"set": name, "without": without, "with": with_,
                             "speedup": with_["tok_s"] / without["tok_s"]})
                print(json.dumps(rows[-1]), flush=True)

    def line(r):
        acc = r["with"]["acceptance"]
        return (f"| {r['set']} | {r['without']['alias']} {r['without']['tok_s']:.1f} | {r['with']['alias']} "
                f"{r['with']['tok_s']:.1f} | {r['speedup']:.2f}x | {'n/a' if acc is None else f'{acc:.2f}'} |")

    write(rows, "| prompts | without (alias, tok/s) | with (alias, tok/s) | speedup | acceptance |\n|---|---|---|---|---|",
          line, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
