#!/usr/bin/env bash
# Issue 27 on one GPU, in one job (~15 min on an H100; carried wheels installed in /tmp/site):
#   setsid nohup bash benchmarks/gpu/run_hf_paged.sh > /root/job.log 2>&1 < /dev/null &
# Llama-3-8B shape, random weights, 128 output tokens, 20 s cells at c = 1 64 256, one server per
# target for all its cells (--reuse-server); the Transformers c=256 cells run 75 s: at the
# ~1,400 tok/s measured 256 streams of 128 tokens take ~25 s to finish their first requests, and
# a 20 s cell of `transformers serve` finished none (benchmarks/RESULTS.md, issue 27):
#   1. the Transformers alias through the service (transformers' continuous batching, SDPA)
#      against `transformers serve --continuous-batching --attn-implementation sdpa`;
#   2. the vLLM alias through the service against vLLM's own api_server (gpu.yaml).
# Everything lands in /tmp/hfpaged (hfpaged.tar.gz at the end, per-request records included,
# for the p99s); "HFPAGED DONE" ends the log.
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/gpu/device_env.sh
D=${DURATION:-20} R=/tmp/hfpaged
rm -rf $R && mkdir -p $R
nvidia-smi -L > $R/gpus.txt
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  > $R/versions.txt 2>&1
python3 -m pip list 2>/dev/null | grep -i -E "^(flash|kernels|vllm)" >> $R/versions.txt
cat $R/gpus.txt $R/versions.txt
python3 benchmarks/gpu/make_random_weights.py benchmarks/gpu/llama3-8b-shape /tmp/llama3-8b-random

bench() {  # tag config backend concurrencies duration
  echo "[$(date +%T)] $1: $3 service raw, c = $4, $5 s"
  # shellcheck disable=SC2086  # several concurrencies, one word each
  python3 benchmarks/run.py --config "$2" --backends "$3" --targets service raw --concurrency $4 \
    --duration "$5" --output-tokens 128 --prompt-words 64 --reuse-server --startup-timeout 900 \
    --stop-timeout 60 --out "$R/$1" > "$R/$1.log" 2>&1
  echo "[$(date +%T)] $1: exit $?"
  for log in "$R/$1"/*/server.log; do echo "== $log"; tail -n 40 "$log"; done > "$R/$1-servers.txt"
}
bench hf benchmarks/gpu/gpu-hf.yaml transformers "1 64" "$D"
bench hf256 benchmarks/gpu/gpu-hf.yaml transformers 256 "${D256:-75}"
bench vllm benchmarks/gpu/gpu.yaml vllm "1 64 256" "$D"
nvidia-smi > $R/nvidia-smi-after.txt 2>&1
tar -C /tmp -czf /tmp/hfpaged.tar.gz --exclude='*.html' --exclude='server.log' hfpaged
echo HFPAGED DONE
