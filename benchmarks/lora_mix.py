"""Throughput with LoRA adapters in the mix: c streams of greedy chats, each request naming the
next model of the mix in turn (a base alias alone, or the base and its adapters "<alias>:<name>"),
so the engine batches requests of different adapters together.

    .venv/bin/python benchmarks/lora_mix.py                     # starts `bentoml serve` here
    .venv/bin/python benchmarks/lora_mix.py --mixes smollm2-vllm smollm2-vllm,smollm2-vllm:alpha,smollm2-vllm:beta
    .venv/bin/python benchmarks/lora_mix.py --base-url http://HOST:3000 --mixes llama3-8b llama3-8b,llama3-8b:sql,llama3-8b:chat

Without --base-url a server on the shipped configuration.yaml starts on 127.0.0.1 (the adapters it
names are built first: tests/lora_adapters.py) and stops at the end. Each mix gets one warm-up
request per model (the base and its adapters load then), then --duration seconds of load.
Reported per mix: completion tokens per second in all and per model, requests, errors, and the
machine's load average (`uptime`) before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.prompts import prompt_text  # noqa: E402

MIXES = ["smollm2-hf", "smollm2-hf,smollm2-hf:alpha,smollm2-hf:beta"]


async def chat(client: httpx.AsyncClient, model: str, salt: int, tokens: int) -> int:
    """One streamed greedy chat of ``tokens`` tokens; its completion tokens (from usage)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt_text(32, salt)}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    used = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: {r.status_code} {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if line.startswith('data: {"error"'):  # an error event (a time limit, the engine): the request failed
                raise RuntimeError(f"{model}: {line[6:206]}")
            if line.startswith("data: {") and '"usage"' in line:
                usage = json.loads(line[6:]).get("usage")
                used = usage["completion_tokens"] if usage else used
    return used


async def run_mix(url: str, models: list[str], concurrency: int, duration: float, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for i, model in enumerate(models):  # loads the base and each adapter before the clock starts
            await chat(client, model, i, 4)
        counts = {m: 0 for m in models}
        done = {m: 0 for m in models}
        errors: list[str] = []
        turn = iter(range(10**9))
        stop = time.monotonic() + duration

        async def worker() -> None:
            while time.monotonic() < stop:
                k = next(turn)
                model = models[k % len(models)]
                try:
                    got = await chat(client, model, k, tokens)  # not `counts[model] += await ...`: it
                    counts[model] += got  # would read the count before the await and lose the others' tokens
                    done[model] += 1
                except Exception as exc:  # noqa: BLE001 - counted, reported
                    errors.append(str(exc)[:200])

        load_before = os.getloadavg()
        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.monotonic() - start
    return {"models": models, "concurrency": concurrency, "seconds": round(wall, 1),
            "tok_s": round(sum(counts.values()) / wall, 1),
            "per_model_tok_s": {m: round(n / wall, 1) for m, n in counts.items()}, "requests": done,
            "errors": len(errors), "first_error": errors[0] if errors else None,
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="a running server (default: start one here)")
    p.add_argument("--mixes", nargs="+", default=MIXES, help="comma-separated model names, one mix each")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per mix")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="a JSON file for the results")
    args = p.parse_args()
    server = None
    url = args.base_url
    if url is None:
        from llmserve.launcher import bentoml_serve
        from tests.lora_adapters import build_all

        build_all()
        server = bentoml_serve(ROOT / ".cache" / "lora-bench-server.log",
                               {"LLMSERVE_LIMITS__MAX_LOADED_MODELS": "8"})
        server.wait_ready(600)
        url = server.url
    try:
        results = []
        for mix in args.mixes:
            row = asyncio.run(run_mix(url, mix.split(","), args.concurrency, args.duration, args.max_tokens))
            print(json.dumps(row), flush=True)
            results.append(row)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
