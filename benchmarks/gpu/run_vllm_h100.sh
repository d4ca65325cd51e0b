#!/usr/bin/env bash
# Issue 25's vLLM cells on one GPU (carried wheels installed in /tmp/site), one phase per device
# call, each well inside a call's 10 minutes; call them back to back (the machine goes back
# ~30 s after a call ends):
#   bash benchmarks/gpu/run_vllm_h100.sh offline   # vLLM's offline batch rate, 256 x 128 tokens (~75 s)
#   bash benchmarks/gpu/run_vllm_h100.sh shipped   # service (as shipped) and vLLM's api_server, c = 1 32 256 (~6.5 min)
#   bash benchmarks/gpu/run_vllm_h100.sh quiet     # service with service.http_metrics / access_log off (~3 min)
# Llama-3-8B shape, random weights (gpu.yaml), 64-word prompts, 128 output tokens, 30 s cells,
# one server per target for all its cells. Results go to $OUT (and /tmp/v25).
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/gpu/device_env.sh
phase=${1:-} R=/tmp/v25
mkdir -p "$R" "$OUT"
nvidia-smi -L > "$OUT/gpus.txt"
python3 -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__)" > "$OUT/versions.txt" 2>&1
bench() {  # config targets
  rm -rf "${R:?}/$phase"
  # shellcheck disable=SC2086  # several targets, one word each
  python3 benchmarks/run.py --config "$1" --backends vllm --targets $2 --concurrency 1 32 256 --duration 30 \
    --output-tokens 128 --prompt-words 64 --reuse-server --startup-timeout 400 --stop-timeout 60 \
    --out "$R/$phase" > "$OUT/$phase.log" 2>&1 || echo "run.py exit $?"
  for log in "$R/$phase"/*/server.log; do echo "== $log"; tail -n 25 "$log"; done > "$OUT/$phase-servers.txt" || true
  cp "$R/$phase/results.json" "$OUT/$phase.json" || true
  cp "$R/$phase/results.md" "$OUT/$phase.md" && cat "$OUT/$phase.md"
}
case $phase in
  offline)
    python3 benchmarks/gpu/vllm_offline.py --config benchmarks/gpu/gpu.yaml --alias smollm2-vllm --batch 256 \
      --output-tokens 128 --prompt-words 64 --out "$OUT/offline.json" > "$OUT/offline.log" 2>&1
    cat "$OUT/offline.json" ;;
  shipped) bench benchmarks/gpu/gpu.yaml "service raw" ;;
  quiet)
    python3 -c "
import yaml
cfg = yaml.safe_load(open('benchmarks/gpu/gpu.yaml'))
cfg.setdefault('service', {}).update(http_metrics=False, access_log=False)
yaml.safe_dump(cfg, open('/tmp/gpu-quiet.yaml', 'w'))"
    bench /tmp/gpu-quiet.yaml service ;;
  *) echo "phase: offline, shipped or quiet" >&2; exit 2 ;;
esac
