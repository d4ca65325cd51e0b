"""The Transformers engine on transformers' own continuous batching (engine: paged, what a GPU
alias gets by default), run on CPU through the alias smollm2-hf-paged: the same model as
smollm2-hf (our own loop) with a paged KV cache of 16 blocks. It answers greedily what the loop
answers, counts max_tokens and usage, honours stop strings and streams; a field its per-request
processors cannot serve is a 400 naming it; a client that leaves frees everything it held."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest

from test_api_features import WEATHER
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
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # the loop may have the prompt cached
    assert {k: paged["usage"][k] for k in counts} == {k: loop["usage"][k] for k in counts}
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


REFUSED = {"logprobs": True, "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2,
           "min_p": 0.1, "logit_bias": {"1": 5}, "response_format": {"type": "json_object"}, "seed": 7,
           "tool_choice": "required"}


@pytest.mark.parametrize("field", list(REFUSED))
def test_a_field_its_processors_cannot_serve_is_a_400_naming_it(http, field):
    body = {"model": PAGED, "messages": QUESTION, "max_tokens": 4, "stream": True, field: REFUSED[field]}
    if field == "tool_choice":  # "required": a call constrained by a grammar
        body["tools"] = [WEATHER]
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_a_request_the_kv_cache_cannot_hold_is_refused_as_past_the_context(http):
    ctx = http.get(f"/v1/models/{PAGED}").json()["context_length"]
    assert ctx < 16 * 256 < 8192  # the cache less the scheduler's margin, below the model's own context
    r = http.post("/v1/chat/completions", json={"model": PAGED, "messages": QUESTION, "max_tokens": ctx})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert f"maximum context length is {ctx} tokens" in error["message"]
    # transformers' loop lives on: such a request would have killed it
    assert chat(http, PAGED, temperature=0, max_tokens=4)["usage"]["completion_tokens"] == 4


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


# In process: transformers' real ContinuousBatchingManager over a tiny Llama of random weights (the
# loop's bookkeeping is what is tested, not the text) and a tokenizer that spells ids, both built
# in well under a second (the GGUF's tokenizer alone takes ~10 s here).

class Ids:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


def paged_engine(model):
    from backends.transformers_paged import PagedEngine

    return PagedEngine(model, Ids(), {0}, max_batch=4, num_blocks=16, memory_fraction=0.5, max_batch_tokens=64,
                       name="tiny", cuda=False)


def loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "_run_generation_loop" in t.name and t.is_alive()]


async def until(condition, what: str, bound: float = 30) -> None:
    deadline = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < deadline, f"{what}, still after {bound:.0f} s"
        await asyncio.sleep(0.05)


class CountingQueue(queue.Queue):
    puts = 0

    def put(self, item, block=True, timeout=None):
        self.puts += 1
        super().put(item, block, timeout)


def test_streams_ended_early_leave_no_output_behind_and_their_handlers_go(tiny):
    from backends.base import SamplingParams

    engine = paged_engine(tiny)
    router = engine.manager.output_router
    router.output_queue = CountingQueue()  # nobody reads it once the engine serves
    # steps of 20 ms: a stream closed on the event loop meets a step in flight, whose output comes late
    slow = tiny.register_forward_pre_hook(lambda *_: time.sleep(0.02))

    async def leave_early():
        for _ in range(4):  # a stop string or a client gone: the stream is closed mid-generation
            stream = engine.stream(list(range(5, 40)), SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
            await stream.__anext__()
            await stream.__anext__()
            await stream.aclose()
        await until(lambda: engine.running() == 0, "the cancelled requests still run")
        await until(lambda: not router.result_handlers, "handlers of cancelled requests stayed registered")

    try:
        asyncio.run(leave_early())
        assert router.output_queue.puts == 0  # every late output went to a handler, none piled up
    finally:
        slow.remove()
        engine.close()


def test_a_failed_warm_up_stops_transformers_loop_thread(tiny, monkeypatch):
    from backends.errors import EngineFailure
    from backends.transformers_paged import PagedEngine

    def fail(self, cuda):
        assert loop_threads(), "the loop should run by the warm-up"
        raise EngineFailure("warm-up failed on purpose")

    monkeypatch.setattr(PagedEngine, "warm_up", fail)
    with pytest.raises(EngineFailure):
        paged_engine(tiny)
    assert not loop_threads()  # joined: it held the model and the KV cache


def test_a_stream_whose_loop_stopped_fails_within_seconds_not_at_the_stall_timeout(tiny):
    from backends.base import SamplingParams
    from backends.errors import EngineFailure

    engine = paged_engine(tiny)

    async def stranded():
        stream = engine.stream(list(range(5, 40)), SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
        await stream.__anext__()
        engine.manager.output_router.result_handlers.clear()  # its outputs and failure never reach it
        engine.manager.output_router.output_queue = queue.Queue()
        await asyncio.to_thread(engine.close)
        with pytest.raises(EngineFailure):
            while True:
                await asyncio.wait_for(stream.__anext__(), 10)

    try:
        asyncio.run(stranded())
    finally:
        engine.close()


@pytest.mark.parametrize("engine, key", [("loop", "kv_cache_blocks"), ("loop", "max_batch_tokens"),
                                         ("loop", "kv_cache_memory_fraction"), ("paged", "prefill_chunk")])
def test_a_knob_of_the_other_engine_is_a_config_error_naming_it(engine, key):
    from pydantic import ValidationError

    from backends.args import TransformersArgs

    with pytest.raises(ValidationError, match=key):
        TransformersArgs(engine=engine, **{key: 0.5 if key == "kv_cache_memory_fraction" else 64})
    TransformersArgs(engine="auto", **{key: 0.5 if key == "kv_cache_memory_fraction" else 64})  # known at load only
