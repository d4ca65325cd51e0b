#!/usr/bin/env bash
# Opt-in: builds the CPU image and checks that it starts and answers (tests/test_container.py).
#   bash scripts/test_container.sh               # on python:3.11-slim (needs Docker Hub)
#   bash scripts/test_container.sh --local-base  # on a base made here (scripts/container_base.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --local-base ]; then bash scripts/container_base.sh; fi
bash scripts/containerize.sh "$@"
LLMSERVE_CONTAINER_TEST=1 .venv/bin/python -m pytest -q -s tests/test_container.py
