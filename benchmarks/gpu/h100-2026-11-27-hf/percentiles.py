"""TTFT and ITL p50/p95/p99 of each issue-27 cell, recomputed from the per-request records kept in
records-*.tar.gz (locust's records/*.jsonl; ITL is each request's mean inter-token gap) with
run.py's percentile (nearest rank over every record of the cell, failures left out):
    python benchmarks/gpu/h100-2026-11-27-hf/percentiles.py > percentiles-from-records.txt"""

import json
import tarfile
from collections import defaultdict
from pathlib import Path


def pct(values: list[float], q: float) -> float:  # as benchmarks/run.py
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else 0.0


cells = defaultdict(list)
for archive in sorted(Path(__file__).parent.glob("records-*.tar.gz")):
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".jsonl"):
                run, cell = Path(member.name).parts[-4:-2]
                lines = tar.extractfile(member).read().decode().splitlines()
                cells[run, cell] += [json.loads(line) for line in lines if line.strip()]
for (run, cell), rows in sorted(cells.items()):
    good = [r for r in rows if "error" not in r]
    ttft = [r["ttft"] * 1000 for r in good]
    itl = [r["itl"] * 1000 for r in good if r["tokens"] > 1]
    print(f"{run} {cell} records={len(rows)} failures={len(rows) - len(good)} "
          f"ttft_p50/p95/p99_ms={pct(ttft, .5):.0f}/{pct(ttft, .95):.0f}/{pct(ttft, .99):.0f} "
          f"itl_p50/p95/p99_ms={pct(itl, .5):.1f}/{pct(itl, .95):.1f}/{pct(itl, .99):.1f}")
