"""`bentoml build` from the project root, with the service's resources taken from the configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def build(tmp_path, **env) -> dict:
    home = tmp_path / "bentoml-home"
    bentoml = Path(sys.executable).parent / "bentoml"
    run = subprocess.run([str(bentoml), "build"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "BENTOML_HOME": str(home), **env})
    assert run.returncode == 0, run.stdout + run.stderr
    (bento_yaml,) = home.glob("bentos/llmserve/*/bento.yaml")
    bento = bento_yaml.parent
    files = {str(p.relative_to(bento)) for p in bento.rglob("*") if p.is_file()}
    assert {"src/service.py", "src/configuration.yaml", "src/llmserve/manager.py", "src/backends/base.py",
            "src/llmserve/ui/index.html", "src/llmserve/ui/static/app.js"} <= files  # the pages too
    assert not any(f.startswith(("src/tests", "src/.venv")) for f in files)
    assert any(f.startswith("env/docker") for f in files)
    return yaml.safe_load(bento_yaml.read_text())


@pytest.mark.parametrize("env,resources", [
    ({}, {}),  # the shipped models run on CPU
    ({"LLMSERVE_SERVICE__GPUS": "2", "LLMSERVE_SERVICE__GPU_TYPE": "nvidia-h200"},
     {"gpu": 2, "gpu_type": "nvidia-h200"}),
])
def test_bentoml_build(tmp_path, env, resources):
    bento = build(tmp_path, **env)
    (svc,) = bento["services"]
    assert svc["name"] == "llmserve"
    assert svc["config"]["resources"] == resources
    assert {r["name"] for r in bento["schema"]["routes"]} >= {"chat", "complete", "embed", "list_models", "load_model",
                                                   "unload_model"}
