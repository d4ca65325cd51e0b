"""Where the Transformers loop's (BatchLoop) time goes: the `smollm2-hf` alias driven in-process
(no HTTP) by ``c`` streams for a fixed time, with wall-clock timers around the loop's stages,
the model's forward pass and the KV cache's per-layer update (the torch.cat that grows it).
Stages nest (a step holds its prefills and decode, which hold forward passes), so shares do
not add up to 100%.

    .venv/bin/python benchmarks/hf_loop_profile.py --concurrency 8 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import backends.transformers_backend as tb  # noqa: E402
from llmserve.config import load_settings  # noqa: E402
from llmserve.manager import make_backend  # noqa: E402
from inprocess import drive  # noqa: E402

spent: collections.Counter = collections.Counter()
calls: collections.Counter = collections.Counter()
STAGES = ["_step", "_decode", "_prefill_chunk", "_join", "_keep", "_sample_one", "_on_token", "_drop_cancelled",
          "_admit", "_hand_over"]


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start
            calls[name] += 1
    return wrapper


async def run(args) -> None:
    from transformers.cache_utils import DynamicLayer

    for name in STAGES:
        setattr(tb.BatchLoop, name, timed(name, getattr(tb.BatchLoop, name)))
    DynamicLayer.update = timed("KV cache update (torch.cat)", DynamicLayer.update)
    cfg = load_settings(args.config).models[args.alias]
    if args.max_batch:
        cfg.transformers.max_batch = args.max_batch
    backend = make_backend(args.alias, cfg)
    await backend.load()
    backend.model.forward = timed("model forward", backend.model.forward)
    spent.clear()
    calls.clear()
    start = time.perf_counter()
    try:
        records = await drive(backend, args)  # the in-process cells' streams and prompts
    finally:
        wall = time.perf_counter() - start
        await backend.unload()
    tokens = sum(r["tokens"] for r in records)
    print(f"c={args.concurrency} max_batch={backend.config.transformers.max_batch}: {tokens} tokens in {wall:.1f} s "
          f"= {tokens / wall:.1f} tok/s, {calls['_step']} steps")
    print("| stage | seconds | share of wall | calls | ms a call |\n| --- | ---: | ---: | ---: | ---: |")
    for name, seconds in spent.most_common():
        print(f"| {name} | {seconds:.2f} | {100 * seconds / wall:.1f}% | {calls[name]} | "
              f"{1000 * seconds / max(calls[name], 1):.2f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--alias", default="smollm2-hf")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--max-batch", type=int, default=None, help="instead of the alias's own")
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=32)
    asyncio.run(run(p.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
