#!/usr/bin/env bash
# Every H100 figure of benchmarks/RESULTS.md in one go (on the device machine, carried wheels
# installed in /tmp/site); results in $OUT. Runs ~20 minutes: start it with setsid and collect
# $OUT from later calls.
set -uo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-30} TAG=vllm bash benchmarks/gpu/run_h100.sh vllm "service raw" "1 32 256"
PYTHONPATH=/tmp/site python3 benchmarks/gpu/make_random_weights.py benchmarks/gpu/llama3-8b-shape /tmp/llama3-8b-random
DURATION=${DURATION:-30} TAG=transformers CONFIG=benchmarks/gpu/gpu-hf.yaml \
  bash benchmarks/gpu/run_h100.sh transformers "service raw" "64 256"
echo ALL DONE
