#!/usr/bin/env bash
# Builds the CPU image and checks that it starts, answers, runs as a non-root user, writes nothing
# into its source tree and stops on SIGTERM (tests/test_container.py). CI runs the --local-base form
# after the suite (.ci/run).
#   bash scripts/test_container.sh               # on python:3.11-slim (needs Docker Hub)
#   bash scripts/test_container.sh --local-base  # on a base made here (scripts/container_base.sh),
#                                                # buildah end to end
# Sets up .venv (scripts/setup.sh: nothing to do when it is current) and installs buildah /
# debootstrap where needed (scripts/setup_container_tools.sh: root, apt).
# Each run builds its own tag (llmserve:ci-<commit>-<pid>, or LLMSERVE_IMAGE_TAG) and removes that
# image, the dangling layers and its Bento at exit, failed or not; the base image stays (a cache).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_container_tools.sh "$@"
if [ "${1:-}" = --local-base ]; then engine=buildah
elif docker info >/dev/null 2>&1; then engine=docker
else engine=buildah; fi
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
export LLMSERVE_CONTAINER_ENGINE=$engine
export LLMSERVE_IMAGE_TAG=${LLMSERVE_IMAGE_TAG:-llmserve:ci-$(git rev-parse --short HEAD 2>/dev/null || echo nogit)-$$}
LLMSERVE_BENTO_TAG_FILE=$(mktemp)
export LLMSERVE_BENTO_TAG_FILE
cleanup() {
  echo "test_container: cleaning up $LLMSERVE_IMAGE_TAG"
  if [ $engine = buildah ]; then
    buildah rmi "$LLMSERVE_IMAGE_TAG" >/dev/null 2>&1 || true
    buildah rmi --prune >/dev/null 2>&1 || true
  else
    docker image rm "$LLMSERVE_IMAGE_TAG" >/dev/null 2>&1 || true
    docker image prune -f >/dev/null 2>&1 || true
  fi
  bento=$(cat "$LLMSERVE_BENTO_TAG_FILE" 2>/dev/null || true)
  [ -z "$bento" ] || .venv/bin/bentoml delete "$bento" -y >/dev/null 2>&1 || true
  rm -f "$LLMSERVE_BENTO_TAG_FILE"
  echo "test_container: disk after"; df -h
}
echo "test_container: disk before"; df -h
trap cleanup EXIT
trap 'exit 130' INT TERM
start=$(date +%s)
if [ "${1:-}" = --local-base ]; then bash scripts/container_base.sh; fi
bash scripts/containerize.sh "$@"
echo "test_container: base + image in $(( $(date +%s) - start )) s"
LLMSERVE_CONTAINER_TEST=1 HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/test_container.py
