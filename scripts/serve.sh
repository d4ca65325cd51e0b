#!/usr/bin/env bash
# Sets up .venv (first run only) and serves configuration.yaml's models with bentoml serve.
# Extra arguments go to `bentoml serve` (e.g. --port 3001). Default port: 3000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/bentoml serve service:LLMService "$@"
