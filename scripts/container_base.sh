#!/usr/bin/env bash
# A Debian bookworm base image with Python 3.11 made on this machine, for building the image
# where no registry is reachable (python:3.11-slim cannot be pulled): debootstrap from the
# Debian mirror apt uses, imported into buildah's storage as localhost/llmserve-base:bookworm.
# Needs root, debootstrap and buildah (apt-get install debootstrap buildah). ~2 minutes.
set -euo pipefail
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
image=${LLMSERVE_BASE_IMAGE:-localhost/llmserve-base:bookworm}
root=${ROOTFS:-/var/tmp/llmserve-rootfs}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || { echo "container_base: $tool is missing: apt-get install $tool" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "container_base: debootstrap needs root" >&2; exit 2; }
if buildah inspect --type image "$image" >/dev/null 2>&1; then
  echo "container_base: $image exists"; exit 0
fi
if [ ! -x "$root/usr/bin/python3" ]; then
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "$mirror" || { echo "container_base: debootstrap from $mirror failed" >&2; exit 1; }
fi
# the registry is reached through this machine's CA bundle; the image's own ca-certificates
# package rewrites /etc/ssl/certs, so the bundle goes in under another name (ENVIRONMENT.md)
ca=$(python3 -c "import ssl; print(ssl.get_default_verify_paths().openssl_cafile)")
cp "${SSL_CERT_FILE:-$ca}" "$root/etc/llmserve-build-ca.pem"
ctr=$(buildah from scratch)
buildah copy "$ctr" "$root" / >/dev/null
buildah config --env PIP_CERT=/etc/llmserve-build-ca.pem --env SSL_CERT_FILE=/etc/llmserve-build-ca.pem \
  --env PIP_BREAK_SYSTEM_PACKAGES=1 --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
buildah commit -q "$ctr" "$image" >/dev/null
buildah rm "$ctr" >/dev/null
echo "container_base: $image ($(buildah images --format '{{.Size}}' "$image"))"
