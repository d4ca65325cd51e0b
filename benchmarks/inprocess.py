"""The engine's own limit: one alias's backend driven in-process, no HTTP, ``c`` streams at a
time for a fixed time, the same prompts and output length as the locust cells. benchmarks/run.py
runs it as target `inprocess` (one process per cell) and prints one JSON line.

    .venv/bin/python benchmarks/inprocess.py --alias smollm2 --concurrency 8 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from backends.base import SamplingParams  # noqa: E402
from llmserve.config import load_settings  # noqa: E402
from llmserve.manager import make_backend  # noqa: E402
from prompts import prompt_text  # noqa: E402


async def drive(backend, args) -> list[dict]:
    """``args.concurrency`` streams on a loaded backend for ``args.duration`` seconds, each
    starting its next request when one ends: one record per finished request."""
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0, ignore_eos=True)
    records = []
    stop_at = time.perf_counter() + args.duration

    async def user(n: int):
        salt = n
        while time.perf_counter() < stop_at:
            ids = await backend.encode_chat([{"role": "user", "content": prompt_text(args.prompt_words, salt)}])
            start = time.perf_counter()
            first, tokens = None, 0
            async for d in backend.generate(ids, params):
                first = first or time.perf_counter()
                tokens = d.completion_tokens
            records.append({"start": start, "end": time.perf_counter(), "ttft": first - start, "tokens": tokens})
            salt += args.concurrency

    await asyncio.gather(*(user(i) for i in range(args.concurrency)))
    return records


async def run(args) -> dict:
    settings = load_settings(args.config)
    backend = make_backend(args.alias, settings.models[args.alias])
    await backend.load()
    try:
        records = await drive(backend, args)
    finally:
        await backend.unload()
    span = max(r["end"] for r in records) - min(r["start"] for r in records)
    ttft = sorted(r["ttft"] for r in records)
    return {"requests": len(records), "output_tokens": sum(r["tokens"] for r in records),
            "tok_s": sum(r["tokens"] for r in records) / span, "ttft_p50": ttft[len(ttft) // 2],
            "ttft_p95": ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--alias", required=True)
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=32)
    print(json.dumps(asyncio.run(run(p.parse_args()))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
