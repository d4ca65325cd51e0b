"""Speculative decoding per alias (`speculative:`): on vLLM its n-gram proposer (prompt lookup)
proposes tokens the model checks in one pass, so a greedy answer is exactly the one without it,
and /metrics counts the proposed and accepted tokens. An engine that does not serve the method
refuses the alias at load, naming the key."""

from __future__ import annotations

import httpx
import pytest

from llmserve.config import load_settings
from llmserve.errors import APIError
from llmserve.manager import ModelManager

SPEC = "smollm2-vllm-ngram"
CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n" * 3
REPEAT = [{"role": "user", "content": f"Repeat this code exactly:\n{CODE}"}]
FREE = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def spec_loaded(server, vllm_loaded):
    r = httpx.post(f"{server.url}/models/{SPEC}/load", timeout=600)
    assert r.status_code == 200, r.text
    yield SPEC
    httpx.post(f"{server.url}/models/{SPEC}/unload", timeout=120)  # its memory back for the rest of the suite


def _greedy(http, model, messages, max_tokens=48):
    r = http.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": max_tokens,
                                                "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("messages", [REPEAT, FREE], ids=["repetitive", "free"])
def test_greedy_answers_are_the_same_with_and_without_speculation(http, spec_loaded, messages):
    assert _greedy(http, SPEC, messages) == _greedy(http, "smollm2-vllm", messages)


def test_proposed_and_accepted_tokens_are_counted(server, http, spec_loaded):
    drafted = server.metric("llm_speculative_draft_tokens_total", model=SPEC)
    accepted = server.metric("llm_speculative_accepted_tokens_total", model=SPEC)
    _greedy(http, SPEC, REPEAT, max_tokens=48)
    # vLLM hands its step statistics over a little after the tokens
    from conftest import wait_for

    wait_for(lambda: server.metric("llm_speculative_draft_tokens_total", model=SPEC) > drafted,
             "the drafted-token counter to grow")
    new_drafted = server.metric("llm_speculative_draft_tokens_total", model=SPEC) - drafted
    new_accepted = server.metric("llm_speculative_accepted_tokens_total", model=SPEC) - accepted
    # copying code back is what prompt lookup is for: most proposals are right
    assert 0 < new_accepted <= new_drafted
    assert new_accepted / new_drafted > 0.3, (new_accepted, new_drafted)
    assert http.get(f"/v1/models/{SPEC}").json()["speculative"]["method"] == "ngram"


async def test_an_engine_without_the_method_refuses_the_alias_naming_the_key():
    settings = load_settings()
    cfg = settings.models["smollm2"].model_copy(update={"speculative": settings.models[SPEC].speculative})
    settings.models["smollm2-speculating"] = cfg
    manager = ModelManager(settings)
    with pytest.raises(APIError) as caught:
        await manager.load("smollm2-speculating")
    assert caught.value.status == 400 and caught.value.param == "speculative"
    assert "llamacpp" in caught.value.message and "vLLM" in caught.value.message
