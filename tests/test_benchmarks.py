"""The benchmark harness end to end in --quick mode (no speed assertions), and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(ROOT / "benchmarks" / "run.py")]


def run(args, tmp_path, timeout=600):
    return subprocess.run(RUN + args + ["--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_quick_matrix_writes_tables_and_plots_from_one_server_per_target(tmp_path):
    r = run(["--quick", "--smoke"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    data = json.loads((out / "results.json").read_text())
    cells = {(c["backend"], c["target"], c["concurrency"]): c for c in data["cells"]}
    assert set(cells) == {("llamacpp", t, c) for t in ("service", "raw") for c in (1, 8)}
    for cell in cells.values():
        assert cell["ok"] and cell["requests"] >= 1 and cell["output_tokens"] >= 1 and cell["tok_s"] > 0
        assert 0 < cell["ttft_p50"] <= cell["ttft_p95"]
    table = (out / "results.md").read_text()
    assert "| llamacpp | service | 8 |" in table and "service / raw" in table
    for png in ("tok_s.png", "ttft.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "llamacpp-service-c8" / "locust.html").exists()
    assert "cell 4/4" in r.stdout  # progress is shown
    # --quick starts one server per target for all its concurrencies, and records its stop
    assert "one server per target" in table
    for target in ("service", "raw"):
        first, second = cells[("llamacpp", target, 1)], cells[("llamacpp", target, 8)]
        assert first["startup_s"] > 0 and second["startup_s"] == 0  # started once
        assert (out / f"llamacpp-{target}-c1" / "server.log").exists()
        assert not (out / f"llamacpp-{target}-c8" / "server.log").exists()
        assert second["extra"]["shutdown"]["processes_left"] == []  # the last cell records the stop
    service = cells[("llamacpp", "service", 1)]["extra"]
    smoke = service["openai_smoke"]  # --smoke: a chat and a stream through the openai client
    assert smoke["chat_completion_tokens"] >= 1 and smoke["stream_chunks"] >= 2 and smoke["stream_chars"] >= 1
    assert service["service_resources"] == {}  # no GPU alias preloaded


def test_unknown_backend_and_bad_concurrency_are_refused(tmp_path):
    r = run(["--backends", "tensorflow"], tmp_path)
    assert r.returncode == 2 and "unknown backend" in r.stderr
    r = run(["--concurrency", "0"], tmp_path)
    assert r.returncode == 2 and "at least 1" in r.stderr


def test_a_target_answering_errors_fails_the_run_but_keeps_the_cells(tmp_path):
    config = yaml.safe_load((ROOT / "configuration.yaml").read_text())
    config["models"]["smollm2"]["llamacpp"]["n_ctx"] = 32  # every benchmark prompt is too long now
    path = tmp_path / "tiny-context.yaml"
    path.write_text(yaml.safe_dump(config))
    r = run(["--backends", "llamacpp", "--targets", "service", "--concurrency", "1", "--duration", "3",
             "--config", str(path)], tmp_path)
    assert r.returncode == 1
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    (cell,) = data["cells"]
    assert not cell["ok"] and "400" in cell["error"]  # the warm-up chat was refused
    assert "cells failed" in r.stdout
