#!/usr/bin/env bash
# Sets up .venv (reused when present) and runs the whole pytest suite on real engines.
# Extra arguments go to pytest (e.g. -k errors -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
