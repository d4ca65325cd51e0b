"""Writes a model directory with random bf16 weights for a config-only directory, so that
servers that load weights from disk (transformers serve) can run the same shape as the
service's `random_weights` / vLLM's `load_format: dummy`.

    python3 benchmarks/gpu/make_random_weights.py benchmarks/gpu/llama3-8b-shape /tmp/llama3-8b-random
"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
if not (dst / "config.json").exists():
    config = AutoConfig.from_pretrained(src)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dst)
    for f in src.iterdir():  # tokenizer and chat template
        if f.name.startswith(("tokenizer", "chat_template", "generation_config")):
            shutil.copy(f, dst / f.name)
print(f"random weights in {dst}")
