#!/usr/bin/env bash
# Installs what scripts/test_container.sh needs to build and run the image: buildah where no
# Docker daemon answers; for --local-base buildah and debootstrap always (that form is buildah end
# to end: the base is committed to buildah's storage). Debian's packages, root, apt-get.
# Nothing happens where they are there already.
#   bash scripts/setup_container_tools.sh [--local-base]
set -euo pipefail
[ "${1:-}" != --local-base ] && docker info >/dev/null 2>&1 && exit 0
need=()
command -v buildah >/dev/null || need+=(buildah)
if [ "${1:-}" = --local-base ] && ! command -v debootstrap >/dev/null; then need+=(debootstrap); fi
((${#need[@]})) || exit 0
[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null ||
  { echo "setup_container_tools: install ${need[*]} (Debian: apt-get install ${need[*]}, as root)" >&2; exit 2; }
echo "setup_container_tools: installing ${need[*]} with apt-get"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
