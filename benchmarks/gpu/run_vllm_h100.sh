#!/usr/bin/env bash
# Issue 25's vLLM cells on one GPU (carried wheels installed in /tmp/site), one phase per device
# call, each well inside a call's 10 minutes; call them back to back (the machine goes back
# ~30 s after a call ends):
#   bash benchmarks/gpu/run_vllm_h100.sh offline   # vLLM's offline batch rate, 256 x 128 tokens (~75 s)
#   bash benchmarks/gpu/run_vllm_h100.sh shipped   # service (as shipped) and vLLM's api_server, c = 1 32 256 (~6.5 min)
#   bash benchmarks/gpu/run_vllm_h100.sh quiet     # service with service.http_metrics / access_log off (~3 min)
# Llama-3-8B shape, random weights (gpu.yaml), 64-word prompts, 128 output tokens, 30 s cells,
# one server per target for all its cells (run_h100.sh). Results go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT"
case ${1:-} in
  offline)
    python3 benchmarks/gpu/vllm_offline.py --config benchmarks/gpu/gpu.yaml --alias smollm2-vllm --batch 256 \
      --output-tokens 128 --prompt-words 64 --out "$OUT/offline.json" > "$OUT/offline.log" 2>&1
    cat "$OUT/offline.json" ;;
  shipped) TAG=shipped REUSE_SERVER=1 bash benchmarks/gpu/run_h100.sh vllm "service raw" "1 32 256" ;;
  quiet)
    python3 -c "
import yaml
cfg = yaml.safe_load(open('benchmarks/gpu/gpu.yaml'))
cfg.setdefault('service', {}).update(http_metrics=False, access_log=False)
yaml.safe_dump(cfg, open('/tmp/gpu-quiet.yaml', 'w'))"
    CONFIG=/tmp/gpu-quiet.yaml TAG=quiet REUSE_SERVER=1 bash benchmarks/gpu/run_h100.sh vllm service "1 32 256" ;;
  *) echo "phase: offline, shipped or quiet" >&2; exit 2 ;;
esac
