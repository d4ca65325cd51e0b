"""The Modal entry file (modal_app.py), offline: importing it builds the Modal app from the
configuration, and the start-up it shares with the BentoML service serves requests through
the ASGI app it hands to Modal. Nothing here reaches Modal."""

from __future__ import annotations

import importlib
import sys

import httpx
import pytest
import yaml

from tests.conftest import ROOT


def import_modal_app(monkeypatch, config: dict | None = None, tmp_path=None):
    if config is not None:
        path = tmp_path / "configuration.yaml"
        path.write_text(yaml.safe_dump(config))
        monkeypatch.setenv("LLMSERVE_CONFIG", str(path))
    sys.modules.pop("modal_app", None)
    return importlib.import_module("modal_app")


def shipped_config() -> dict:
    return yaml.safe_load((ROOT / "configuration.yaml").read_text())


def test_the_default_configuration_asks_for_a_cpu_container_that_scales_to_zero(monkeypatch):
    m = import_modal_app(monkeypatch)
    assert m.CONTAINER["gpu"] is None
    assert m.CONTAINER["scaledown_window"] == 300
    # smollm2 decodes 8 requests together (llama.cpp slots), minilm batches 16
    assert m.MAX_INPUTS == 8 + 16
    service = m.LLMServer._get_class_service_function()
    assert service._spec_.gpus is None


def test_llama3_70b_preloaded_asks_for_two_gpus_of_the_configured_type(monkeypatch, tmp_path):
    config = shipped_config()
    config["models"]["llama3-70b"]["preload"] = True
    config["serverless"] = {"gpu_type": "A100-80GB", "scaledown_window": 120}
    m = import_modal_app(monkeypatch, config, tmp_path)
    assert m.CONTAINER["gpu"] == "A100-80GB:2"  # tensor_parallel_size 2
    assert m.CONTAINER["scaledown_window"] == 120
    assert m.MAX_INPUTS == 8 + 16 + 256  # vLLM serves up to its max_num_seqs (256 by default)
    assert m.LLMServer._get_class_service_function()._spec_.gpus == "A100-80GB:2"


def test_a_bad_serverless_key_stops_the_import_naming_it(monkeypatch, tmp_path):
    config = shipped_config()
    config["serverless"] = {"scaledown_window": 0}
    with pytest.raises(Exception, match="scaledown_window"):
        import_modal_app(monkeypatch, config, tmp_path)


async def test_the_shared_start_up_serves_chat_and_embeddings_through_the_asgi_app(monkeypatch):
    m = import_modal_app(monkeypatch)
    server = m.LLMServer._get_user_cls()()
    # exactly what Modal runs: the @modal.enter method, then the @modal.asgi_app factory
    await m.LLMServer._get_user_cls().start._get_raw_f()(server)
    try:
        asgi = m.LLMServer._get_user_cls().web._get_raw_f()(server)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://modal") as client:
            assert (await client.get("/readyz")).status_code == 200
            chat = await client.post("/v1/chat/completions", json={
                "model": "smollm2", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4})
            assert chat.status_code == 200, chat.text
            assert chat.json()["usage"]["completion_tokens"] >= 1
            emb = await client.post("/v1/embeddings", json={"model": "minilm", "input": ["a cat", "a dog"]})
            assert emb.status_code == 200, emb.text
            assert [len(d["embedding"]) for d in emb.json()["data"]] == [384, 384]
            models = (await client.get("/models")).json()["data"]
            assert {m["id"] for m in models if m["loaded"]} >= {"smollm2", "minilm"}
    finally:
        await m.LLMServer._get_user_cls().stop._get_raw_f()(server)
