#!/usr/bin/env bash
# One GPU cell group of the benchmark matrix on the device machine (see benchmarks/README.md).
#   bash benchmarks/gpu/run_h100.sh vllm service "1 32 256"
# Expects the carried wheels installed in /tmp/site; results go to $OUT.
set -euo pipefail
backend=$1 target=$2 conc=$3
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
bin=$(dirname "$(command -v python3)")  # the harness starts bentoml / locust next to sys.executable
for tool in bentoml locust; do
  [ -x "$bin/$tool" ] || { printf '#!/usr/bin/env bash\nexec python3 -m %s "$@"\n' "$tool" > "$bin/$tool"; chmod +x "$bin/$tool"; }
done
rm -rf "/tmp/bench/$backend-$target"
python3 benchmarks/run.py --config benchmarks/gpu/gpu.yaml --backends "$backend" --targets "$target" \
  --concurrency $conc --duration "${DURATION:-30}" --output-tokens "${TOKENS:-128}" --prompt-words 64 \
  --startup-timeout 400 --stop-timeout 60 --out "/tmp/bench/$backend-$target" 2>&1 | tee "$OUT/$backend-$target.log" || true
# only a few files come back from the device: the figures, and the server logs' tails on failure
cp "/tmp/bench/$backend-$target/results.json" "$OUT/$backend-$target.json"
cp "/tmp/bench/$backend-$target/results.md" "$OUT/$backend-$target.md"
for log in /tmp/bench/$backend-$target/*/server.log; do
  echo "== $log"; tail -n 30 "$log"
done > "$OUT/$backend-$target-servers.txt"
