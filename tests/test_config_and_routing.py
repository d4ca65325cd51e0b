"""Configuration validation, engine choice and manager routing (fakes allowed here: no engine claims)."""

from __future__ import annotations

import asyncio
import importlib.util
import textwrap
from pathlib import Path

import pytest

from llmserve import config as config_mod, manager as manager_mod
from backends.base import CHAT, COMPLETION, Backend, Delta
from llmserve.config import ConfigError, ModelConfig, load_settings
from llmserve.errors import EngineNotInstalled, InvalidRequest, ModelNotFound
from llmserve.manager import ModelManager, make_backend

ROOT_CONFIG = Path(__file__).resolve().parent.parent / "configuration.yaml"

MINIMAL = """
default_model: a
models:
  a: {source: some/model, backend: transformers}
"""


def write(tmp_path, text):
    p = tmp_path / "configuration.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_shipped_configuration_is_valid():
    s = load_settings()
    assert s.default_model == "smollm2" and s.embedding_model == "minilm"
    assert s.models["smollm2"].preload and s.models["minilm"].preload
    assert s.models["llama3-8b"].vllm.tensor_parallel_size == 1
    assert s.models["llama3-70b"].vllm.tensor_parallel_size == 2
    assert s.models["llama3-70b"].vllm.swap_space == 4
    assert s.service_resources() == {}  # nothing preloaded needs a GPU


@pytest.mark.parametrize("text,named", [
    (MINIMAL + "bogus_key: 1\n", "bogus_key"),
    (MINIMAL.replace("backend: transformers", "backend: tensorflow"), "models.a.backend"),
    (MINIMAL + "limits: {max_tokens: -3}\n", "limits.max_tokens"),
    (MINIMAL.replace("{source: some/model,", "{source: some/model, n_ctx: 5,"), "models.a.n_ctx"),
    (MINIMAL.replace("default_model: a", "default_model: zzz"), "zzz"),
    (MINIMAL.replace("{source: some/model,", "{"), "models.a"),
    ("models: [1, 2]\n", "models"),
])
def test_bad_configuration_fails_with_the_key_named(tmp_path, text, named):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert named in str(info.value)


def test_invalid_yaml_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "models: {a: [}\n"))


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, MINIMAL + "  b: {source: other/model}\n")
    monkeypatch.setenv("LLMSERVE_DEFAULT_MODEL", "b")
    monkeypatch.setenv("LLMSERVE_LIMITS__MAX_TOKENS", "77")
    s = load_settings(path)
    assert s.default_model == "b" and s.limits.max_tokens == 77
    assert s.limits.default_max_tokens is None and s.limits.request_timeout == 600  # untouched keys keep their defaults
    monkeypatch.setenv("LLMSERVE_LIMITS__MAX_TOKENS", "lots")
    with pytest.raises(ConfigError, match="limits.max_tokens"):
        load_settings(path)


def test_service_gpus_follow_tensor_and_pipeline_parallel(tmp_path):
    s = load_settings(write(tmp_path, """
        default_model: big
        models:
          big: {source: x/y, preload: true, vllm: {tensor_parallel_size: 2, pipeline_parallel_size: 2}}
          small: {source: x/z, vllm: {tensor_parallel_size: 8}}
    """))
    assert s.service_resources() == {"gpu": 4}  # only preloaded models count
    s.service.gpus, s.service.gpu_type = 8, "nvidia-h100-80gb"
    assert s.service_resources() == {"gpu": 8, "gpu_type": "nvidia-h100-80gb"}


def test_backend_choice(monkeypatch):
    gguf = ModelConfig(source="models/x.Q4_0.gguf")
    hf = ModelConfig(source="meta-llama/Meta-Llama-3-8B-Instruct")
    forced = ModelConfig(source="meta-llama/Meta-Llama-3-8B-Instruct", backend="transformers")
    assert gguf.chosen_backend() == "llamacpp"
    assert forced.chosen_backend() == "transformers"
    monkeypatch.setattr(config_mod, "engine_installed", lambda name: name == "vllm")
    assert hf.chosen_backend() == "vllm"
    monkeypatch.setattr(config_mod, "engine_installed", lambda name: False)
    assert hf.chosen_backend() == "transformers"


def test_without_vllm_the_pending_limit_and_gpus_follow_the_engine_the_manager_loads(tmp_path, monkeypatch):
    """A Hugging Face alias with no `backend:` on a host where vLLM cannot be imported runs on
    Transformers: its pending limit is 8x Transformers' batch, not 8x vLLM's max_num_seqs, and the
    service declares no GPU for the tensor-parallel vLLM arguments it will not use."""
    s = load_settings(write(tmp_path, """
        default_model: hf
        models:
          hf:
            source: some/model
            preload: true
            vllm: {tensor_parallel_size: 2}
            transformers: {max_batch: 4}
    """))
    cfg = s.models["hf"]
    real = importlib.util.find_spec  # vLLM made un-importable, for every check that asks
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] == "vllm" else real(name, *a))
    loads = make_backend("hf", cfg)  # what the manager would load
    assert loads.name == "transformers" and ModelManager(s).list_models()[0]["backend"] == "transformers"
    assert cfg.pending_limit() == 8 * 4, "the pending limit of an engine that does not run"
    assert cfg.concurrency() == 4 and s.concurrency() == 4
    assert s.service_resources() == {}, "a GPU declared for a vLLM that is not installed"
    monkeypatch.setattr(importlib.util, "find_spec", real)  # with vLLM: tensor parallel 2 on vLLM
    assert make_backend("hf", cfg).name == "vllm"
    assert s.service_resources() == {"gpu": 2} and cfg.pending_limit() == 8 * cfg.vllm.concurrency


def test_missing_engine_is_named_with_how_to_install(monkeypatch):
    real = manager_mod.importlib.util.find_spec
    monkeypatch.setattr(manager_mod.importlib.util, "find_spec", lambda n: None if n == "llama_cpp" else real(n))
    with pytest.raises(EngineNotInstalled) as info:
        make_backend("tiny", ModelConfig(source="x.gguf"))
    msg = str(info.value)
    assert "llama_cpp" in msg and "pip install" in msg and info.value.status == 400


class FakeBackend(Backend):
    """Stands in for an engine only to test routing; no engine claim rests on it."""

    name = "fake"
    loads = 0

    async def load(self):
        FakeBackend.loads += 1

    async def unload(self):
        pass

    def capabilities(self):
        return {CHAT, COMPLETION}

    def context_length(self):
        return 100

    def running_requests(self):
        return 0

    async def encode_chat(self, messages):
        return [1, 2, 3]

    async def encode_text(self, text):
        return [1, 2]

    async def generate(self, prompt_ids, params):
        yield Delta("x", 1, "length")


def fake_manager(tmp_path, monkeypatch, extra=""):
    monkeypatch.setattr(manager_mod, "make_backend", lambda alias, cfg: FakeBackend(alias, cfg))
    s = load_settings(write(tmp_path, MINIMAL + "  b: {source: b/b}\n  c: {source: c/c}\n" + extra))
    return ModelManager(s)


def test_load_on_demand_off_answers_how_to_load(tmp_path, monkeypatch):
    m = fake_manager(tmp_path, monkeypatch, "load_on_demand: false\n")

    async def use():
        async with m.use("a", CHAT):
            pass

    with pytest.raises(InvalidRequest) as info:
        asyncio.run(use())
    assert info.value.code == "model_not_loaded" and "/models/a/load" in info.value.message
    with pytest.raises(ModelNotFound):
        asyncio.run(m.load("nope"))


def test_max_loaded_models_unloads_the_least_recently_used(tmp_path, monkeypatch):
    m = fake_manager(tmp_path, monkeypatch, "limits: {max_loaded_models: 2}\n")

    async def run():
        await m.load("a")
        await m.load("b")
        async with m.use("a", CHAT):
            pass  # a is now more recently used than b
        await m.load("c")
        return set(m.loaded)

    assert asyncio.run(run()) == {"a", "c"}


def _engine_fields():
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def test_tensor_parallel_alias_maps_to_engine_args_and_gpu_resources(tmp_path):
    """The llama3-70b path without two GPUs: config -> vLLM engine arguments -> service resources."""
    from backends.vllm_backend import engine_kwargs

    shipped = load_settings()
    big = shipped.models["llama3-70b"]
    kwargs = engine_kwargs(big.vllm, "meta-llama/Meta-Llama-3-70B-Instruct", _engine_fields())
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["model"] == "meta-llama/Meta-Llama-3-70B-Instruct"
    assert kwargs["max_model_len"] == 8192 and kwargs["gpu_memory_utilization"] == 0.9
    assert "pipeline_parallel_size" in kwargs and "load_format" not in kwargs  # unset keys stay vLLM's defaults
    assert big.gpus() == 2 and shipped.models["llama3-8b"].gpus() == 1

    text = (ROOT_CONFIG.read_text().replace("preload: true", "preload: false")
            .replace("description: Llama 3 70B Instruct across two GPUs", "preload: true"))
    s = load_settings(write(tmp_path, text))
    assert s.service_resources() == {"gpu": 2}


def test_unknown_vllm_engine_argument_is_named():
    from backends.errors import BadInput
    from backends.vllm_backend import engine_kwargs

    args = ModelConfig(source="x/y", vllm={"extra": {"enable_prefix_caching": True, "warp_drive": 9}}).vllm
    with pytest.raises(BadInput, match="warp_drive"):
        engine_kwargs(args, "x/y", _engine_fields())
    ok = ModelConfig(source="x/y", vllm={"extra": {"enable_prefix_caching": True}, "load_format": "dummy"}).vllm
    kwargs = engine_kwargs(ok, "x/y", _engine_fields())
    assert kwargs["enable_prefix_caching"] is True and kwargs["load_format"] == "dummy"
