#!/usr/bin/env bash
# The vLLM claims (issue 15) on the device machine, carried wheels installed in /tmp/site:
#   setsid bash benchmarks/gpu/run_claims.sh > /tmp/claims.log 2>&1 &
# ~15 minutes; results in /tmp/claims (claims.json grows alias by alias) and, at the end, $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/gpu/device_env.sh
python3 benchmarks/gpu/vllm_claims.py --out /tmp/claims --duration "${DURATION:-30}" "$@"
echo CLAIMS DONE
