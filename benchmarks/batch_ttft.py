"""Interactive chat TTFT on an idle server, then beside a large batch (the Batch API's fairness
claim: within 2x of idle). A fresh `bentoml serve` of the shipped configuration on a store of its
own; one streamed chat request at a time to the default alias (its time to the first content
chunk), ``--requests`` of them idle, then the same beside a batch of ``--lines`` chat lines on the
same alias; the batch's progress is reported too (lines done per second while measured). Idle and
beside phases alternate (``--rounds``; each beside phase runs a fresh batch of the one uploaded
file, cancelled at its end), so both see the same noise from the rest of a shared machine.

    .venv/bin/python benchmarks/batch_ttft.py --lines 2000 --requests 10 --rounds 3 --out benchmarks/results/batch-ttft
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from llmserve.launcher import bentoml_serve  # noqa: E402

PROMPT = "Write one sentence about the sea."


def ttft(client: httpx.Client, alias: str, tokens: int) -> float:
    """Seconds from sending a streamed chat request to its first chunk with content."""
    body = {"model": alias, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
            "stream": True, "temperature": 0}
    start = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():  # read to the end: the request ends as a client's would
            if first is None and line.startswith("data: {") and any(
                    c["delta"].get("content") for c in json.loads(line[6:])["choices"]):
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("the stream ended without content")
    return first


def measure(client: httpx.Client, alias: str, n: int, tokens: int) -> list[float]:
    return [ttft(client, alias, tokens) for _ in range(n)]


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50_ms": 1000 * statistics.median(ordered), "p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))],
            "mean_ms": 1000 * statistics.fmean(ordered)}


def load() -> str:
    """The load average (1, 5, 15 minutes): other work on this machine skews every figure."""
    return "%.2f %.2f %.2f" % os.getloadavg()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--lines", type=int, default=2000, help="chat lines in the batch")
    p.add_argument("--line-tokens", type=int, default=32, help="max_tokens of each batch line")
    p.add_argument("--requests", type=int, default=10, help="interactive requests per phase, idle and beside")
    p.add_argument("--rounds", type=int, default=3, help="idle / beside phase pairs (a fresh batch each)")
    p.add_argument("--tokens", type=int, default=16, help="max_tokens of each interactive request")
    p.add_argument("--alias", default="smollm2")
    p.add_argument("--slot-share", type=float, default=None, help="batches.slot_share (default: the config's)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "batch-ttft")
    args = p.parse_args()
    # a SIGTERM (a timeout's) unwinds through the finally below, so the server is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"LLMSERVE_BATCHES__STORE_PATH": str(Path(tempfile.mkdtemp(prefix="batch-ttft-")) / "batches.sqlite3"),
           "LLMSERVE_RESPONSES__STORE_PATH": str(Path(tempfile.mkdtemp(prefix="batch-ttft-")) / "r.sqlite3"),
           "LLMSERVE_MODELS__MINILM__PRELOAD": "false", "LLMSERVE_BATCHES__MAX_FILE_BYTES": str(64 << 20),
           "LLMSERVE_LIMITS__MAX_BODY_BYTES": str(64 << 20)}
    if args.slot_share is not None:
        env["LLMSERVE_BATCHES__SLOT_SHARE"] = str(args.slot_share)
    server = bentoml_serve(args.out / "server.log", env)
    result: dict = {"lines": args.lines, "line_tokens": args.line_tokens, "requests": args.requests,
                    "rounds": args.rounds, "tokens": args.tokens, "alias": args.alias, "slot_share": args.slot_share,
                    "phases": []}
    idle, beside, done, span = [], [], 0, 0.0
    try:
        server.wait_ready(300)
        with httpx.Client(base_url=server.url, timeout=300) as client:
            measure(client, args.alias, 3, args.tokens)  # warm up
            lines = "\n".join(json.dumps({
                "custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": args.alias, "max_tokens": args.line_tokens, "ignore_eos": True,
                         "messages": [{"role": "user", "content": f"Tell story number {i} about the sea."}]}})
                for i in range(args.lines))
            f = client.post("/v1/files", files={"file": ("batch.jsonl", lines.encode())}, data={"purpose": "batch"})
            f.raise_for_status()
            # idle and beside phases alternate, so both see the same noise from the rest of the machine
            for _ in range(args.rounds):
                phase = {"load_idle": load()}
                idle_ms = measure(client, args.alias, args.requests, args.tokens)
                batch = client.post("/v1/batches", json={"input_file_id": f.json()["id"], "completion_window": "24h",
                                                         "endpoint": "/v1/chat/completions"}).json()
                deadline = time.monotonic() + 120
                while client.get(f"/v1/models/{args.alias}").json()["in_use"] == 0:
                    assert time.monotonic() < deadline, "the batch never started"
                    time.sleep(0.05)
                url = f"/v1/batches/{batch['id']}"
                start, before = time.monotonic(), client.get(url).json()["request_counts"]["completed"]
                phase["load_beside"] = load()
                beside_ms = measure(client, args.alias, args.requests, args.tokens)
                phase_span = time.monotonic() - start
                phase_done = client.get(url).json()["request_counts"]["completed"] - before
                client.post(f"{url}/cancel").raise_for_status()
                while client.get(url).json()["status"] != "cancelled":  # its lines stopped before the next idle
                    time.sleep(0.05)
                phase.update(idle=summary(idle_ms), beside=summary(beside_ms), batch_lines_done=phase_done,
                             batch_lines_per_s=phase_done / phase_span)
                result["phases"].append(phase)
                idle += idle_ms
                beside += beside_ms
                done, span = done + phase_done, span + phase_span
        result.update(idle=summary(idle), beside=summary(beside), batch_lines_per_s=done / span)
        result["ratio_p50"] = result["beside"]["p50_ms"] / result["idle"]["p50_ms"]
        result["ratio_p90"] = result["beside"]["p90_ms"] / result["idle"]["p90_ms"]
    finally:
        server.stop()
    (args.out / "batch-ttft.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
