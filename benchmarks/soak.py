"""Soak: the mixed load of benchmarks/soak_locustfile.py at a fixed concurrency against a
fresh `bentoml serve`, with the server's resident memory (all its processes) sampled every
10 s. Passes with 0 failed requests and the memory after the last minute within 10% of
the memory after the first.

    .venv/bin/python benchmarks/soak.py --minutes 10 --users 16 --out benchmarks/results/soak
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from llmserve.launcher import BIN, bentoml_serve  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak")
    p.add_argument("--max-growth", type=float, default=0.10, help="allowed memory growth, first to last minute")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    server = bentoml_serve(args.out / "server.log")
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    try:
        server.wait_ready(300)
        start = time.monotonic()

        def sample():
            while not stop.wait(10):
                samples.append((time.monotonic() - start, server.rss_bytes()))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        seconds = int(args.minutes * 60)
        subprocess.run([str(BIN / "locust"), "-f", str(ROOT / "benchmarks" / "soak_locustfile.py"), "--headless",
                        "-H", server.url, "-u", str(args.users), "-r", str(args.users), "-t", f"{seconds}s",
                        "--stop-timeout", "30", "--csv", str(args.out / "locust"), "--only-summary",
                        "--loglevel", "WARNING"], cwd=ROOT, timeout=seconds + 120,
                       stdout=(args.out / "locust.log").open("wb"), stderr=subprocess.STDOUT)
        stop.set()
        sampler.join()
    finally:
        server.stop()
    with (args.out / "locust_stats.csv").open() as f:
        total = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    requests, failures = int(total["Request Count"]), int(total["Failure Count"])
    minute = 60 if args.minutes >= 2 else 10
    first = next((rss for t, rss in samples if t >= minute), samples[0][1] if samples else 0)
    last = samples[-1][1] if samples else 0
    growth = (last - first) / first if first else 0.0
    result = {"minutes": args.minutes, "users": args.users, "requests": requests, "failures": failures,
              "rss_first_minute_mib": round(first / 2**20), "rss_end_mib": round(last / 2**20),
              "rss_growth": round(growth, 4), "rps": round(float(total["Requests/s"]), 2),
              "samples": [(round(t), round(rss / 2**20)) for t, rss in samples]}
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    return 0 if failures == 0 and requests > 0 and growth <= args.max_growth else 1


if __name__ == "__main__":
    sys.exit(main())
