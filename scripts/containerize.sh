#!/usr/bin/env bash
# Builds the service's container image: `bentoml build`, then `bentoml containerize`.
#   bash scripts/containerize.sh                 # CPU image on python:3.11-slim (needs Docker Hub)
#   bash scripts/containerize.sh --local-base    # on localhost/llmserve-base:bookworm, made here
#                                                # by scripts/container_base.sh (no registry needed)
#   bash scripts/containerize.sh --gpu           # the CUDA vLLM variant (requirements/lock-gpu.txt)
# Docker when its daemon answers, else buildah (STORAGE_DRIVER=vfs, BUILDAH_ISOLATION=chroot);
# --local-base always buildah (the base lives in buildah's storage).
# The image is tagged llmserve:<variant> (LLMSERVE_IMAGE_TAG overrides); the Bento stays in
# BentoML's store (its tag is written to LLMSERVE_BENTO_TAG_FILE when that is set).
set -euo pipefail
cd "$(dirname "$0")/.."
variant=cpu base=""
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) variant=gpu ;;
    --local-base) base=${LLMSERVE_BASE_IMAGE:-localhost/llmserve-base:bookworm} ;;
    *) echo "containerize: unknown option $1 (use --gpu, --local-base)" >&2; exit 2 ;;
  esac
  shift
done
image=${LLMSERVE_IMAGE_TAG:-llmserve:$variant}
fail() { echo "containerize: $*" >&2; exit 2; }
# the container engine, and where it keeps its layers (a failed build reports their free space)
if [ -z "$base" ] && docker info >/dev/null 2>&1; then
  backend=docker store=$(docker info --format '{{.DockerRootDir}}' 2>/dev/null || true)
elif command -v buildah >/dev/null; then
  backend=buildah
  export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
  store=$(buildah info --format '{{.store.GraphRoot}}' 2>/dev/null || true)
else
  fail "no container engine: ${base:+--local-base needs buildah; }start a Docker daemon, or install buildah (apt-get install buildah)"
fi
if [ -n "$base" ]; then
  buildah inspect --type image "$base" >/dev/null 2>&1 || fail "base image $base is missing: run 'bash scripts/container_base.sh' first"
fi
[ -x .venv/bin/bentoml ] || fail ".venv is missing: run 'bash scripts/setup.sh' first"

# this build's bentofile: the locked requirements of the variant, the base image, and the wheels
# that go into the Bento (BentoML takes wheels from inside the build context only)
rm -rf build/image && mkdir -p build/image/wheels
# llama-cpp-python has no binary wheel on PyPI: the one compiled for .venv (pip's wheel cache
# keeps it; compiled once here otherwise) goes in, so the image needs no compiler
llama=$(grep -m1 '^llama-cpp-python==' "requirements/lock-$variant.txt")
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  .venv/bin/pip wheel -q --no-deps "$llama" -w build/image/wheels || fail "could not build the $llama wheel"
wheels=$(ls build/image/wheels/llama_cpp_python-*.whl)
# torch's CPU build: the wheel pip finds on this machine, else its index
torch=$(ls "$(pip config get global.find-links 2>/dev/null || echo /nonexistent)"/torch-*+cpu-*.whl 2>/dev/null | head -1 || true)
if [ "$variant" = cpu ] && [ -n "$torch" ]; then
  cp "$torch" build/image/wheels/ && wheels="$wheels build/image/wheels/$(basename "$torch")"
fi
.venv/bin/python - "$variant" "$base" "$torch" $wheels <<'PY'
import sys, yaml
variant, base, torch, *wheels = sys.argv[1:]
bento = yaml.safe_load(open("bentofile.yaml"))
py = bento["python"]
py["requirements_txt"] = f"requirements/lock-{variant}.txt"
py["wheels"], py["find_links"] = wheels, ["/home/bentoml/bento/env/python/wheels"]  # BENTO_PATH
if variant == "cpu" and not torch:  # no local CPU torch: download.pytorch.org
    py["extra_index_url"] = ["https://download.pytorch.org/whl/cpu"]
    py["pip_args"] = "--index-strategy unsafe-best-match"
if base:
    bento["docker"]["base_image"] = base
yaml.safe_dump(bento, open("build/image/bentofile.yaml", "w"), sort_keys=False)
PY
start=$(date +%s)
tag=$(.venv/bin/bentoml build -f build/image/bentofile.yaml --output tag 2>build/image/build.log | tail -1 | sed 's/^__tag__://' || true)
[ -n "$tag" ] || fail "bentoml build failed: $(tail -1 build/image/build.log) (all of it in build/image/build.log)"
[ -z "${LLMSERVE_BENTO_TAG_FILE:-}" ] || echo "$tag" > "$LLMSERVE_BENTO_TAG_FILE"
echo "containerize: built Bento $tag; building the image with $backend ..."
# free space where the layers go: a buildah (vfs) build of the CPU image took ~10.4 GB of disk at
# its peak here (2026-11-27), and its "no space left on device" is buried in the output
store=${store:-/var/lib}
while [ ! -d "$store" ]; do store=$(dirname "$store"); done
free="$(df -BG --output=avail "$store" | tail -1 | tr -dc 0-9) GB free on $store"
.venv/bin/bentoml containerize "$tag" --backend "$backend" -t "$image" \
  || { echo "containerize: the image build failed (output above); $free (the CPU image took ~10.4 GB at its" \
            "peak on buildah: if the output says 'no space left on device', free disk, e.g. 'buildah rmi --prune')" >&2
       exit 1; }
if [ $backend = buildah ]; then size=$(buildah images --format '{{.Size}}' "$image" | head -1)
else size=$(docker image inspect -f '{{.Size}}' "$image"); fi
echo "containerize: $image built in $(( $(date +%s) - start )) s, $size ($free before the build)"
