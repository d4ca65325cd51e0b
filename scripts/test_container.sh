#!/usr/bin/env bash
# Builds the CPU image and checks that it starts, answers, runs as a non-root user, writes nothing
# into its source tree and stops on SIGTERM (tests/test_container.py). CI runs the --local-base form.
#   bash scripts/test_container.sh               # on python:3.11-slim (needs Docker Hub)
#   bash scripts/test_container.sh --local-base  # on a base made here (scripts/container_base.sh)
# Where no Docker daemon answers and buildah / debootstrap are missing, installs them (root, apt).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! docker info >/dev/null 2>&1; then
  need=()
  command -v buildah >/dev/null || need+=(buildah)
  [ "${1:-}" = --local-base ] && ! command -v debootstrap >/dev/null && need+=(debootstrap)
  if ((${#need[@]})); then
    [ "$(id -u)" = 0 ] || { echo "test_container: install ${need[*]} (apt-get, as root)" >&2; exit 2; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
start=$(date +%s)
if [ "${1:-}" = --local-base ]; then bash scripts/container_base.sh; fi
bash scripts/containerize.sh "$@"
echo "test_container: base + image in $(( $(date +%s) - start )) s"
LLMSERVE_CONTAINER_TEST=1 HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/test_container.py
