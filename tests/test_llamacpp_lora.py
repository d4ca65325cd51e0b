"""LoRA adapters on llama.cpp's slot loop, in-process on the shipped SmolLM2 (served as F16: the
float32 PEFT answers are what it must give) with the two PEFT adapters of tests/lora_adapters.py,
converted to LoRA GGUFs on load: each adapter's greedy answer is PEFT's merged model's and
llama-cpp-python's own (a Llama with the adapter, alone), the base's differs; base and adapters in
one batch keep their answers; unloading does not disturb running requests; an adapter that does
not fit the base is a BadInput naming it and what does not fit."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest

from backends.base import ADMITTED, Adapter, SamplingParams
from backends.errors import BadInput

from tests.lora_adapters import build_all, merged_greedy

PROMPT = [{"role": "user", "content": "Write a haiku about the sea."}]
MAX_TOKENS = 16
WAIT = 120  # seconds: bounds every generation on a busy 2-core machine


@pytest.fixture(scope="module")
def adapters():
    return build_all()


@pytest.fixture(scope="module")
async def backend(adapters):
    """Built as the manager builds it (make_backend) from the shipped alias, served as F16."""
    from llmserve.config import load_settings
    from llmserve.manager import make_backend

    config = load_settings().models["smollm2"]
    config = config.model_copy(update={"llamacpp": config.llamacpp.model_copy(update={"quantize": "F16", "parallel": 4})})
    backend = make_backend("smollm2-f16", config)
    await backend.load()
    for name, path in adapters.items():
        await backend.load_adapter(Adapter(name, path))
    yield backend
    await backend.unload()


@pytest.fixture(scope="module")
async def prompt_ids(backend):
    return await backend.encode_chat(PROMPT)


async def answer(backend, ids, adapter=None, first=None) -> str:
    """The greedy answer; ``first`` (an Event) is set once the first token came."""
    async def run():
        text = []
        async for delta in backend.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, adapter=adapter)):
            if delta is ADMITTED:
                continue
            text.append(delta.text)
            if first is not None:
                first.set()
        return "".join(text)

    return await asyncio.wait_for(run(), WAIT)


def text_of(backend, ids: list[int]) -> str:
    return backend.model.detokenize(ids, special=False).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
async def solo(backend, prompt_ids):
    """Each one's answer with nothing else running."""
    return {name: await answer(backend, prompt_ids, name) for name in (None, "alpha", "beta")}


async def test_each_adapter_answers_as_peft_merged_and_unlike_the_base(backend, prompt_ids, solo):
    assert len(set(solo.values())) == 3, solo
    for name, got in solo.items():
        want = text_of(backend, merged_greedy(name, prompt_ids, MAX_TOKENS))
        assert got == want, f"{name}: llama.cpp F16 {got!r}, PEFT float32 merged {want!r}"


async def test_each_adapter_answers_as_llama_cpp_alone(backend, prompt_ids, solo, adapters):
    """llama-cpp-python's own Llama with the adapter (lora_path: the converted GGUF), one sequence."""
    import llama_cpp

    from backends.convert import peft_to_lora_gguf

    for name in ("alpha", "beta"):
        lora = peft_to_lora_gguf(adapters[name], backend._metadata)
        llm = llama_cpp.Llama(model_path=backend._model_path(), lora_path=str(lora), n_ctx=512, flash_attn=True,
                              n_threads=2, verbose=False)
        try:
            out = llm.create_completion(prompt_ids, max_tokens=MAX_TOKENS, temperature=0.0)
        finally:
            llm.close()
        assert solo[name] == out["choices"][0]["text"], name


async def test_base_and_two_adapters_in_one_batch_keep_their_answers(backend, prompt_ids, solo):
    names = [None, "alpha", "beta", "alpha", None, "beta"]
    mixed = backend.scheduler.mixed_steps
    got = await asyncio.gather(*(answer(backend, prompt_ids, name) for name in names))
    assert backend.scheduler.mixed_steps > mixed, "the groups never decoded in one step"
    assert got == [solo[name] for name in names]


async def test_unloading_an_adapter_leaves_running_requests_alone(backend, prompt_ids, solo, adapters):
    started_base, started_beta = asyncio.Event(), asyncio.Event()
    base = asyncio.ensure_future(answer(backend, prompt_ids, None, started_base))
    beta = asyncio.ensure_future(answer(backend, prompt_ids, "beta", started_beta))
    await asyncio.wait_for(asyncio.gather(started_base.wait(), started_beta.wait()), WAIT)
    loaded = backend.scheduler.adapters["alpha"], backend.scheduler.adapters["beta"]
    await backend.unload_adapter("alpha")  # idle: freed at once
    assert loaded[0].ptr is None
    await backend.unload_adapter("beta")  # still running one request: freed when it ends
    assert await base == solo[None]
    assert await beta == solo["beta"]
    assert loaded[1].ptr is None
    with pytest.raises(BadInput) as refused:
        await answer(backend, prompt_ids, "alpha")
    assert refused.value.param == "model" and "alpha" in str(refused.value)
    for name in ("alpha", "beta"):  # back for the tests after this one
        await backend.load_adapter(Adapter(name, adapters[name]))
    assert await answer(backend, prompt_ids, "alpha") == solo["alpha"]


def _peft_copy(src, dst, edit_config=None, edit_tensors=None):
    from safetensors.numpy import load_file, save_file

    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    config = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file(edit_tensors(tensors) if edit_tensors else tensors, str(dst / "adapter_model.safetensors"))
    return dst


def _wider(tensors):
    """An adapter made for a base with 960-wide hidden states (SmolLM2-360M's), not 576."""
    return {k: np.zeros((v.shape[0], 960), v.dtype) + 0.01 if "lora_A" in k else v for k, v in tensors.items()}


def _deeper(tensors):
    """One more layer than the base has."""
    extra = {k.replace("layers.0.", "layers.30."): v for k, v in tensors.items() if ".layers.0." in k}
    return {**tensors, **extra}


def _other_arch(path):
    import gguf

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((4, 576), np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.ones((576, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


async def test_an_adapter_that_does_not_fit_is_bad_input_naming_it(backend, prompt_ids, solo, adapters, tmp_path):
    alpha = adapters["alpha"]
    cases = {
        # name -> (source, what the message must name)
        "wider": (_peft_copy(alpha, tmp_path / "wider", edit_tensors=_wider), "blk.0.attn_q.weight"),
        "deeper": (_peft_copy(alpha, tmp_path / "deeper", edit_tensors=_deeper), "model.layers.30.self_attn"),
        "dora": (_peft_copy(alpha, tmp_path / "dora", edit_config=lambda c: {**c, "use_dora": True}), "use_dora"),
        "qwen": (_other_arch(tmp_path / "qwen.gguf"), "arch"),
        "missing": (tmp_path / "nothing-here", "nothing-here"),
    }
    for name, (source, key) in cases.items():
        with pytest.raises(BadInput) as refused:
            await asyncio.wait_for(backend.load_adapter(Adapter(name, source)), WAIT)
        message = str(refused.value)
        assert refused.value.param == "model", name
        assert repr(name) in message and key in message, message
        assert name not in backend.scheduler.adapters
    assert await answer(backend, prompt_ids, "beta") == solo["beta"]  # the engine serves on
