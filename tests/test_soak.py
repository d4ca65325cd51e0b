"""The soak benchmark in short (benchmarks/soak.py: 10 minutes at 16 users is the recorded
run): 20 s of the mixed load at 4 users on a fresh server, every answer checked, none failed."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_a_short_soak_of_the_mixed_load_loses_no_request(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "0.34", "--users", "4",
                          "--out", str(tmp_path), "--max-growth", "0.5"], capture_output=True, text=True, timeout=400)
    result = json.loads((tmp_path / "soak.json").read_text())
    # ~95 requests in 20 s on an idle 2-core machine; fewer on a busy one, but a load all the same
    assert result["requests"] > 30 and result["failures"] == 0, (result, run.stdout[-2000:])
    assert run.returncode == 0, run.stdout[-2000:]
