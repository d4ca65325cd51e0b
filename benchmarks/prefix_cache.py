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
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from llmserve.launcher import bentoml_serve  # noqa: E402

# ~1,000 tokens of SmolLM2's tokenizer
SYSTEM = "You are a helpful assistant for a travel agency. " + " ".join(
    f"Policy {i}: quote prices in euros, be brief, and never promise refunds." for i in range(62))
QUESTIONS = [f"Suggest a weekend trip number {i} in Europe." for i in range(1000)]


async def chat(client: httpx.AsyncClient, alias: str, system: str, question: str, tokens: int) -> dict:
    body = {"model": alias, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    start, ttft, usage = time.perf_counter(), None, {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    return {"ttft": ttft if ttft is not None else time.perf_counter() - start,
            "prompt": usage.get("prompt_tokens", 0),
            "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


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
    server = None
    url = args.url
    if url is None:
        log = Path(tempfile.mkdtemp(prefix="prefix-bench-")) / "server.log"
        server = bentoml_serve(log, env={"LLMSERVE_LIMITS__MAX_LOADED_MODELS": "8"})
        server.wait_ready(300)
        url = server.url
    rows = []
    try:
        for alias in args.aliases:
            r = httpx.post(f"{url}/models/{alias}/load", timeout=600)
            r.raise_for_status()
            for shared in (False, True):
                rows.append(asyncio.run(run_mode(url, alias, shared, args.requests, args.concurrency, args.tokens)))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if server is not None:
            server.stop()
    print(f"\n| alias | mode | prompt tokens | cached tokens | TTFT p50 s | TTFT p90 s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['alias']} | {r['mode']} | {r['prompt_tokens']:.0f} | {r['cached_tokens']:.0f} | "
              f"{r['ttft_p50']:.3f} | {r['ttft_p90']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
