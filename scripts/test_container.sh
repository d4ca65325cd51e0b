#!/usr/bin/env bash
# Builds the CPU image and checks that it starts, answers, runs as a non-root user, writes nothing
# into its source tree and stops on SIGTERM (tests/test_container.py). CI runs the --local-base form
# after the suite (.ci/run).
#   bash scripts/test_container.sh               # on python:3.11-slim (needs Docker Hub)
#   bash scripts/test_container.sh --local-base  # on a base made here (scripts/container_base.sh)
# Sets up .venv (scripts/setup.sh: nothing to do when it is current) and, where no Docker daemon
# answers, installs buildah / debootstrap (scripts/setup_container_tools.sh: root, apt).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_container_tools.sh "$@"
start=$(date +%s)
if [ "${1:-}" = --local-base ]; then bash scripts/container_base.sh; fi
bash scripts/containerize.sh "$@"
echo "test_container: base + image in $(( $(date +%s) - start )) s"
LLMSERVE_CONTAINER_TEST=1 HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/test_container.py
