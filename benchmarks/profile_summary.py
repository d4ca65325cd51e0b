"""Where a server's CPU time went, from py-spy's collapsed stacks (``py-spy record --format raw``,
as ``benchmarks/frontend.py --profile`` writes them): each sample is counted once, for the
innermost frame that belongs to a stage of the per-token path (threads waiting on a lock or
a queue left out), and shown as a share and,
given ``--us-per-chunk`` (the server's CPU time per chunk, measured beside it), as
microseconds per chunk.

    .venv/bin/python benchmarks/profile_summary.py results/frontend-X/service-c64.folded --us-per-chunk 21.3
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

# (stage, pattern searched in "function (file:line)"), the first stage matched from the leaf up wins
STAGES = [
    ("engine: model forward / sampling (torch, llama.cpp)", r"torch/|llama_cpp/|transformers/|xgrammar"),
    ("engine thread: step loop, emit, detokenize", r"backends/"),
    ("metrics (llm_* Prometheus updates)", r"llmserve/metrics\.py|prometheus_client/"),
    ("JSON encoding", r"json/encoder\.py|\(json/__init__|orjson"),
    ("chunk builder (serving: _stream, Deadline, Release; web: the SSE response)", r"llmserve/serving/|llmserve/web/"),
    ("stub engine", r"benchmarks/stub_engine\.py"),
    ("OpenTelemetry ASGI", r"opentelemetry/"),
    ("BentoML middleware / app", r"bentoml/"),
    ("Starlette / FastAPI / anyio (StreamingResponse, routing)", r"starlette/|fastapi/|anyio/"),
    ("uvicorn / h11 / httptools (HTTP framing, write)", r"uvicorn/|h11/|httptools"),
    ("stall deadline (asyncio Timeout.reschedule per token)", r"asyncio/timeouts\.py"),
    ("asyncio event loop (scheduling, selector, call_soon_threadsafe)", r"asyncio/|selectors\.py|threading\.py|queue\.py"),
]
IDLE = re.compile(r"\(threading\.py:|\(queue\.py:")


def summarize(lines, us_per_chunk: float | None = None, top: int = 15) -> str:
    stages: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if IDLE.search(frames[-1]):
            continue  # a thread parked on a lock or queue that py-spy still counts as active
        total += n
        leaves[frames[-1]] += n
        for frame in reversed(frames):
            stage = next((name for name, pattern in STAGES if re.search(pattern, frame)), None)
            if stage is not None:
                stages[stage] += n
                break
        else:
            stages["other (interpreter, C code)"] += n
    if not total:
        return "no samples"
    per_chunk = us_per_chunk / total if us_per_chunk else None
    out = ["| stage | share of samples |" + (" µs per chunk |" if per_chunk else ""),
           "| --- | ---: |" + (" ---: |" if per_chunk else "")]
    for name, n in stages.most_common():
        out.append(f"| {name} | {100 * n / total:.1f}% |" + (f" {n * per_chunk:.2f} |" if per_chunk else ""))
    out += ["", f"{total} samples; the busiest leaf frames:", ""]
    for frame, n in leaves.most_common(top):
        out.append(f"- {100 * n / total:.1f}% {frame}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folded", nargs="+")
    p.add_argument("--us-per-chunk", type=float, help="the server's CPU µs per chunk, to split by stage")
    a = p.parse_args(argv)
    lines = [line for path in a.folded for line in open(path)]
    print(summarize(lines, a.us_per_chunk))
    return 0


if __name__ == "__main__":
    sys.exit(main())
