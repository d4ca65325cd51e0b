#!/usr/bin/env bash
# One group of GPU cells of the benchmark matrix on the device machine (see benchmarks/README.md),
# side by side in one run when several targets are given:
#   bash benchmarks/gpu/run_h100.sh vllm "service raw" "1 32 256"
# Expects the carried wheels installed in /tmp/site; results go to $OUT (and /tmp/bench/<tag>).
# REUSE_SERVER=1: one server per target for all its concurrencies (run.py --reuse-server).
set -euo pipefail
backend=$1 targets=$2 conc=$3 tag=${TAG:-$1}
source benchmarks/gpu/device_env.sh
rm -rf "/tmp/bench/$tag"
# shellcheck disable=SC2086  # several targets and concurrencies, one word each
python3 benchmarks/run.py --config "${CONFIG:-benchmarks/gpu/gpu.yaml}" --backends "$backend" --targets $targets \
  --concurrency $conc --duration "${DURATION:-30}" --output-tokens "${TOKENS:-128}" --prompt-words 64 \
  --startup-timeout 400 --stop-timeout 60 ${REUSE_SERVER:+--reuse-server} --out "/tmp/bench/$tag" 2>&1 | tee "/tmp/bench-$tag.log" || true
mkdir -p "$OUT"
cp "/tmp/bench-$tag.log" "$OUT/$tag.log"
# only a few files come back from the device: the figures, and the server logs' tails
cp "/tmp/bench/$tag/results.json" "$OUT/$tag.json"
cp "/tmp/bench/$tag/results.md" "$OUT/$tag.md"
for log in /tmp/bench/$tag/*/server.log; do
  echo "== $log"; tail -n 30 "$log"
done > "$OUT/$tag-servers.txt"
