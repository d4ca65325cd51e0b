"""The Transformers engine on transformers' own continuous batching (engine: paged, what a GPU
alias gets by default), run on CPU through the alias smollm2-hf-paged: the same model as
smollm2-hf (our own loop) with a paged KV cache of 16 blocks. It answers greedily what the loop
answers, counts max_tokens and usage, honours stop strings and streams; a field its per-request
processors cannot serve is a 400 naming it; a client that leaves frees everything it held."""

from __future__ import annotations

import pytest

from test_batching import stream_chat
from test_disconnects import CHAT, counts, idle, send_and_keep_open, wait_for

PAGED, LOOP = "smollm2-hf-paged", "smollm2-hf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", autouse=True)
def paged_loaded(http):
    for model in (PAGED, LOOP):
        r = http.post(f"/models/{model}/load", timeout=300)
        assert r.status_code == 200, r.text
    yield
    http.post(f"/models/{PAGED}/unload", timeout=120)  # its KV cache is not kept for the rest of the session


def chat(http, model: str, **fields) -> dict:
    r = http.post("/v1/chat/completions", json={"model": model, "messages": QUESTION, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_paged_engine_reports_its_bounded_kv_cache(http):
    info = http.get(f"/v1/models/{PAGED}").json()
    assert info["engine"] == "paged"
    assert info["kv_cache"]["blocks"] == 16  # kv_cache_blocks in configuration.yaml
    assert info["kv_cache"]["bytes"] > 0
    assert http.get(f"/v1/models/{LOOP}").json()["engine"] == "loop"  # CPU aliases keep our own loop


def test_a_greedy_answer_matches_the_loop_engine_token_for_token(http):
    paged = chat(http, PAGED, temperature=0, max_tokens=16)
    loop = chat(http, LOOP, temperature=0, max_tokens=16)
    assert paged["choices"][0]["message"]["content"] == loop["choices"][0]["message"]["content"]
    assert "Paris" in paged["choices"][0]["message"]["content"]
    assert paged["usage"] == loop["usage"]
    assert paged["choices"][0]["finish_reason"] == loop["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_ends_the_generation_and_usage_counts_it(http):
    greedy = chat(http, PAGED, temperature=0, max_tokens=5, ignore_eos=True)
    assert greedy["usage"]["completion_tokens"] == 5
    assert greedy["choices"][0]["finish_reason"] == "length"
    sampled = chat(http, PAGED, temperature=0.8, top_p=0.9, top_k=40, max_tokens=7, ignore_eos=True)
    assert sampled["usage"]["completion_tokens"] == 7
    assert sampled["usage"]["prompt_tokens"] == greedy["usage"]["prompt_tokens"]


def test_a_stop_string_ends_the_answer_before_it(http):
    answer = chat(http, PAGED, temperature=0, max_tokens=16, stop=[" Paris"])
    assert answer["choices"][0]["message"]["content"] == "The capital of France is"
    assert answer["choices"][0]["finish_reason"] == "stop"


def test_a_stream_delivers_the_same_text_and_its_usage(server, http):
    whole = chat(http, PAGED, temperature=0, max_tokens=16)
    streamed = stream_chat(server.url, PAGED, QUESTION[0]["content"], temperature=0, max_tokens=16)
    assert streamed["text"] == whole["choices"][0]["message"]["content"]
    assert len(streamed["times"]) > 1  # token by token, not one chunk at the end
    assert streamed["usage"] == whole["usage"]
    assert streamed["finish"] == "stop"


@pytest.mark.parametrize("field, value", [("logprobs", True), ("presence_penalty", 0.5), ("seed", 7)])
def test_a_field_its_processors_cannot_serve_is_a_400_naming_it(http, field, value):
    r = http.post("/v1/chat/completions", json={"model": PAGED, "messages": QUESTION, "max_tokens": 4,
                                                "stream": True, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_a_client_that_leaves_mid_stream_frees_the_request(server, http):
    wait_for(lambda: idle(server, http, PAGED), f"{PAGED} busy before the test")
    sock = send_and_keep_open(server, "/v1/chat/completions", {**CHAT, "stream": True, "model": PAGED})
    try:
        wait_for(lambda: counts(server, http, PAGED)["engine"] >= 1, f"{PAGED} did not start the generation")
    finally:
        sock.close()
    wait_for(lambda: idle(server, http, PAGED), f"{PAGED}: a count stayed raised after the client left")
    # the engine goes on serving: the cancelled request's blocks came back
    assert chat(http, PAGED, temperature=0, max_tokens=4)["usage"]["completion_tokens"] == 4
