# Sourced by the device scripts: the carried wheels in /tmp/site on the path, and bentoml /
# locust commands next to python3 (the harness starts them beside sys.executable).
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
bin=$(dirname "$(command -v python3)")
for tool in bentoml locust; do
  [ -x "$bin/$tool" ] || { printf '#!/usr/bin/env bash\nexec python3 -m %s "$@"\n' "$tool" > "$bin/$tool"; chmod +x "$bin/$tool"; }
done
