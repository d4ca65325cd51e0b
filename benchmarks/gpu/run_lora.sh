#!/usr/bin/env bash
# Issue 34's LoRA cells on one GPU (carried wheels installed in /tmp/site): the service on vLLM,
# Llama-3-8B shape with random weights (gpu.yaml's smollm2-vllm) and two random rank-16 adapters
# on q/v (make_random_adapters.py), c=8 and c=64 streams over the base alone and over base + a1 + a2
# (benchmarks/lora_mix.py). Results go to $OUT.
#   bash benchmarks/gpu/run_lora.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT"
python3 benchmarks/gpu/make_random_adapters.py benchmarks/gpu/llama3-8b-shape /tmp/adapters a1 a2
python3 - <<'PY'
import yaml
cfg = yaml.safe_load(open("benchmarks/gpu/gpu.yaml"))
alias = cfg["models"]["smollm2-vllm"]
alias["adapters"] = {"a1": "/tmp/adapters/a1", "a2": "/tmp/adapters/a2"}
cfg["models"] = {"smollm2-vllm": alias}
cfg.setdefault("service", {}).update(http_metrics=False, access_log=False)
yaml.safe_dump(cfg, open("/tmp/lora-gpu.yaml", "w"))
PY
python3 - <<'PY' 2>&1 | tee "$OUT/lora.log"
import os, subprocess, sys
from pathlib import Path
from llmserve.launcher import bentoml_serve
server = bentoml_serve(Path("/tmp/lora-server.log"), {"LLMSERVE_CONFIG": "/tmp/lora-gpu.yaml"})
try:
    print("ready after", server.wait_ready(480), "s", flush=True)
    for c in ("8", "64"):
        subprocess.run([sys.executable, "benchmarks/lora_mix.py", "--base-url", server.url, "--concurrency", c,
                        "--duration", "30", "--max-tokens", "128", "--out", f"{os.environ['OUT']}/lora-c{c}.json",
                        "--mixes", "smollm2-vllm", "smollm2-vllm,smollm2-vllm:a1,smollm2-vllm:a2"], check=True)
finally:
    server.stop()
    os.system(f"tail -n 40 /tmp/lora-server.log > {os.environ['OUT']}/lora-server-tail.txt")
PY
