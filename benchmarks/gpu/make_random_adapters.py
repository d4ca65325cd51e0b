"""Writes PEFT LoRA adapter directories with random weights for a config-only model directory
(the GPU benchmarks' Llama-3-8B shape), without loading the base: the LoRA throughput cells need
adapters of the real shape, not good ones.

    python3 benchmarks/gpu/make_random_adapters.py benchmarks/gpu/llama3-8b-shape /tmp/adapters a1 a2 a3
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

src, dst, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
config = json.loads((src / "config.json").read_text())
hidden, layers = config["hidden_size"], config["num_hidden_layers"]
head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
out = {"q_proj": config["num_attention_heads"] * head_dim, "v_proj": config["num_key_value_heads"] * head_dim}
RANK = 16
for seed, name in enumerate(names):
    torch.manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for module, width in out.items():
            key = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(RANK, hidden) * 0.01).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(width, RANK) * 0.01).to(torch.bfloat16)
    path = dst / name
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.0,
        "target_modules": list(out), "bias": "none", "base_model_name_or_path": str(src),
        "fan_in_fan_out": False, "inference_mode": True}))
print(f"{len(names)} adapters in {dst}")
