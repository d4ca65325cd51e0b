#!/usr/bin/env bash
# Tensor parallel through the service against vLLM's own server (issue 22), on a device machine
# of two or four GPUs with the carried wheels installed in /tmp/site:
#   setsid bash benchmarks/gpu/run_multi_gpu.sh > /tmp/multi.log 2>&1 < /dev/null &
# Llama-3-8B shape at TP=2 (service, raw) and TP=1 (service, one GPU) at c = 1 32 256; the
# Llama-3-70B shape at TP=2 (bf16, or fp8 on 80 GB cards) at c = 1 64, and at TP=4 in bf16 where
# four GPUs are there. On four GPUs the 8B and 70B TP=2 groups run at once on disjoint GPU pairs.
# Everything lands in /tmp/multi (multi.tar.gz at the end); ~15 min on four GPUs.
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/gpu/device_env.sh
D=${DURATION:-20} CFG=benchmarks/gpu/multi-gpu.yaml
rm -rf /tmp/multi && mkdir -p /tmp/multi
ngpu=$(nvidia-smi -L | wc -l)
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
nvidia-smi -L > /tmp/multi/gpus.txt
echo "gpus=$ngpu memory_mib=$mib"

bench() {  # tag gpus alias targets concurrencies
  local tag=$1 gpus=$2 alias=$3 targets=$4 conc=$5
  echo "[$(date +%T)] $tag: $alias on GPUs $gpus, $targets, c = $conc"
  # shellcheck disable=SC2086  # several targets and concurrencies, one word each
  CUDA_VISIBLE_DEVICES=$gpus python3 benchmarks/run.py --config $CFG --backends vllm --alias "$alias" \
    --targets $targets --concurrency $conc --duration "$D" --output-tokens 128 --prompt-words 64 \
    --reuse-server --smoke --startup-timeout 900 --stop-timeout 60 --out "/tmp/multi/$tag" \
    > "/tmp/multi/$tag.log" 2>&1
  echo "[$(date +%T)] $tag: exit $?"
}

started() {  # did every server of the run come up (no cell failed before its load)?
  python3 - "$1" <<'PY'
import json, sys
cells = json.load(open(sys.argv[1] + "/results.json"))["cells"]
sys.exit(1 if any(c["requests"] == 0 and "server" in c["error"] for c in cells) else 0)
PY
}

seventy() {  # the 70B shape at TP=2: the seed's swap_space first, without it if that fails to start
  local gpus=$1 alias=llama3-70b-tp2
  ((mib < 100000)) && alias=llama3-70b-tp2-fp8  # two H100s: bf16 weights leave no KV cache
  bench 70b-tp2 "$gpus" "$alias" "service raw" "1 64"
  if ! started /tmp/multi/70b-tp2; then
    echo "70B with swap_space failed to start; again without it"
    mv /tmp/multi/70b-tp2 /tmp/multi/70b-tp2-swap-failed
    bench 70b-tp2 "$gpus" "$alias-noswap" "service raw" "1 64"
  fi
}

if ((ngpu >= 4)); then
  { bench 8b-tp2 0,1 llama3-8b-tp2 "service raw" "1 32 256"; bench 8b-tp1 0 llama3-8b-tp1 "service raw" "1 32 256"; } &
  seventy 2,3 &
  wait
  bench 70b-tp4 0,1,2,3 llama3-70b-tp4 "service raw" "1 64"
else
  bench 8b-tp2 0,1 llama3-8b-tp2 "service raw" "1 32 256"
  bench 8b-tp1 0 llama3-8b-tp1 "service" "1 32 256"
  seventy 0,1
fi
nvidia-smi > /tmp/multi/nvidia-smi-after.txt 2>&1
for d in /tmp/multi/*/; do
  for log in "$d"*/server.log; do echo "== $log"; tail -n 40 "$log"; done > "${d%/}-servers.txt"
done
tar -C /tmp -czf /tmp/multi.tar.gz --exclude='*/records' --exclude='*.html' --exclude='server.log' multi
echo MULTI DONE
