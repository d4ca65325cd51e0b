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
# libgomp1: the OpenMP runtime the llama-cpp-python wheel links (BentoML's system_packages are
# ignored on a custom base, so it goes in here)
packages=python3,python3-venv,python3-pip,ca-certificates,libgomp1
# one base build at a time on this machine (the rootfs directory and the image name are shared)
exec 9>"${root%/}.lock"
flock 9
label() { buildah inspect --type image --format '{{index .OCIv1.Config.Labels "llmserve.packages"}}' "$image" 2>/dev/null; }
if [ "$(label)" = "$packages" ]; then
  echo "container_base: $image exists"; exit 0
fi
if [ "$(cat "$root/.llmserve-packages" 2>/dev/null)" != "$packages" ]; then
  rm -rf "$root"
  debootstrap --variant=minbase --include=$packages bookworm "$root" "$mirror" \
    || { echo "container_base: debootstrap from $mirror failed" >&2; exit 1; }
  echo "$packages" > "$root/.llmserve-packages"
fi
# the registry is reached through this machine's CA bundle; the image's own ca-certificates
# package rewrites /etc/ssl/certs, so the bundle goes in under another name (ENVIRONMENT.md)
ca=$(python3 -c "import ssl; print(ssl.get_default_verify_paths().openssl_cafile)")
cp "${SSL_CERT_FILE:-$ca}" "$root/etc/llmserve-build-ca.pem"
ctr=$(buildah from scratch)
buildah copy "$ctr" "$root" / >/dev/null
buildah config --env PIP_CERT=/etc/llmserve-build-ca.pem --env SSL_CERT_FILE=/etc/llmserve-build-ca.pem \
  --env PIP_BREAK_SYSTEM_PACKAGES=1 --env LANG=C.UTF-8 --cmd /bin/bash --label llmserve.packages=$packages "$ctr"
buildah commit -q "$ctr" "$image" >/dev/null
buildah rm "$ctr" >/dev/null
echo "container_base: $image ($(buildah images --format '{{.Size}}' "$image"))"
