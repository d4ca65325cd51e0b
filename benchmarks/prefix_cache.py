"""Time to first token with a shared ~1,000-token system prompt, read from the engines' prefix
caches, against the same load where every system prompt differs (nothing to share), per alias:

    .venv/bin/python benchmarks/prefix_cache.py                      # starts a server (smollm2, -hf, -vllm)
    .venv/bin/python benchmarks/prefix_cache.py --url http://127.0.0.1:3000 --aliases smollm2

Each alias gets, per mode, one request that warms it (in "shared" mode it also puts the system
prompt in the cache, as the first user of a deployment would), then --requests streamed chats at
--concurrency, each with its own question; TTFT is the time to the first content chunk. The
figures print as a table and go to --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.chat_client import chat, serving, write  # noqa: E402

# ~1,000 tokens of SmolLM2's tokenizer
SYSTEM = "You are a helpful assistant for a travel agency. " + " ".join(
    f"Policy {i}: quote prices in euros, be brief, and never promise refunds." for i in range(62))
QUESTIONS = [f"Suggest a weekend trip number {i} in Europe." for i in range(1000)]


async def run_mode(url: str, alias: str, shared: bool, requests: int, concurrency: int, tokens: int) -> dict:
    def system() -> str:  # unshared: a different first word in every request, so no prefix matches
        return SYSTEM if shared else f"{uuid.uuid4().hex} {SYSTEM}"

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await chat(client, alias, system(), "Say hello.", tokens)
        queue = list(range(requests))
        results = []

        async def user():
            while queue:
                i = queue.pop()
                results.append(await chat(client, alias, system(), QUESTIONS[i], tokens))

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    return {"alias": alias, "mode": "shared" if shared else "unshared", "requests": requests,
            "concurrency": concurrency, "prompt_tokens": statistics.mean(r["prompt"] for r in results),
            "cached_tokens": statistics.mean(r["cached"] for r in results),
            "ttft_p50": statistics.median(ttfts), "ttft_p90": ttfts[int(0.9 * (len(ttfts) - 1))],
            "wall_s": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (else one is started with the shipped configuration)")
    p.add_argument("--aliases", nargs="+", default=["smollm2", "smollm2-hf", "smollm2-vllm"])
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    rows = []
    with serving(args.url, {"LLMSERVE_LIMITS__MAX_LOADED_MODELS": "8"}) as url:
        for alias in args.aliases:
            httpx.post(f"{url}/models/{alias}/load", timeout=600).raise_for_status()
            for shared in (False, True):
                rows.append(asyncio.run(run_mode(url, alias, shared, args.requests, args.concurrency, args.tokens)))
                print(json.dumps(rows[-1]), flush=True)
    write(rows, "| alias | mode | prompt tokens | cached tokens | TTFT p50 s | TTFT p90 s |\n|---|---|---|---|---|---|",
          lambda r: f"| {r['alias']} | {r['mode']} | {r['prompt_tokens']:.0f} | {r['cached_tokens']:.0f} | "
                    f"{r['ttft_p50']:.3f} | {r['ttft_p90']:.3f} |", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
