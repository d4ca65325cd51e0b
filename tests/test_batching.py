"""Many requests at once on the batching engines (llama.cpp slots, the Transformers loop):
each request gets exactly what it would get alone, a client that leaves frees its place at
once, a long prompt does not stall the others, and embeddings are batched."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import threading
import time

import httpx
import pytest

from conftest import BOUND, GENERATIVE, wait_for

PROMPTS = ["What is the capital of France?", "Tell me a joke about cats.", "Name three colors.",
           "Write a haiku about the sea."]


def stream_chat(url: str, model: str, content: str, times: list | None = None, **fields) -> dict:
    """One streaming chat; returns its text, usage, finish reason and the arrival time of every
    chunk that carries a token, by its text or (with logprobs on) its logprob (appended to
    ``times`` as they come, when the caller passes a list)."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": True,
            "stream_options": {"include_usage": True}, **fields}
    times = [] if times is None else times
    text, usage, finish = [], None, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                content = c["delta"].get("content")
                if content or (c.get("logprobs") or {}).get("content"):
                    times.append(time.monotonic())
                if content:
                    text.append(content)
                finish = c["finish_reason"] or finish
    return {"text": "".join(text), "usage": usage, "finish": finish, "times": times}


def running(http, model: str) -> int:
    return http.get(f"/v1/models/{model}").json()["running_requests"]


@pytest.mark.parametrize("model", GENERATIVE)
def test_sixteen_concurrent_greedy_streams_each_match_the_request_run_alone(server, model):
    alone = {p: stream_chat(server.url, model, p, max_tokens=16, temperature=0) for p in PROMPTS}
    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda i: stream_chat(server.url, model, PROMPTS[i % 4], max_tokens=16,
                                                       temperature=0), range(16)))
    for i, got in enumerate(together):
        want = alone[PROMPTS[i % 4]]
        assert got["text"] == want["text"], f"request {i} differs from the same request alone"
        assert got["finish"] == want["finish"]
        # its own prompt and completion counts (how much of the prompt was cached differs: the same
        # prompts ran before)
        counts = ("prompt_tokens", "completion_tokens", "total_tokens")
        assert {k: got["usage"][k] for k in counts} == {k: want["usage"][k] for k in counts}
        assert 1 <= got["usage"]["completion_tokens"] <= 16


@pytest.mark.parametrize("model", GENERATIVE)
def test_a_client_that_leaves_frees_its_place_within_a_second_while_the_others_finish(server, http, model):
    others: list[dict] = []

    def long_stream():
        # long enough that the first of them is still running when the second is admitted
        others.append(stream_chat(server.url, model, PROMPTS[1], max_tokens=96, temperature=0, ignore_eos=True))

    threads = [threading.Thread(target=long_stream) for _ in range(2)]
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[0]}], "stream": True,
            "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=120) as leaving:
        with leaving.stream("POST", "/v1/chat/completions", json=body) as r:
            for t in threads:
                t.start()
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            wait_for(lambda: running(http, model) == 3, "the other two were not admitted beside this one")
        # the response is closed here: the client is gone
    left = time.monotonic()
    while running(http, model) > 2 and time.monotonic() - left < 1.0:
        time.sleep(0.05)
    assert running(http, model) <= 2, "the closed stream still holds its place after 1 s"
    for t in threads:
        t.join(timeout=120)
    assert len(others) == 2
    for got in others:
        assert got["finish"] == "length" and got["usage"]["completion_tokens"] == 96


@pytest.mark.parametrize("model", GENERATIVE)
def test_a_long_prompt_admitted_mid_stream_does_not_stall_the_other_streams(server, http, model):
    """The bound: while a ~1,500-token prompt is prefilled (in chunks between decode steps),
    no gap between two chunks of a running stream is longer than half of the long
    request's own time to first token. Prefilled in one piece, a gap would take all of it."""
    # unique, so no earlier run's cached prefix shortens the prefill
    long_prompt = f"Run {time.time_ns()}. Summarize this. " + " ".join(f"word{i}" for i in range(380))
    results: list[dict] = []
    progress: list[list[float]] = [[], []]  # each stream's token chunks so far

    def decoding_stream(times):
        # with logprobs on, every token comes in a chunk of its own; without, a token with no
        # text (an end-of-turn token past ignore_eos) sends none, and its step's gap would merge
        # into the next one
        results.append(stream_chat(server.url, model, PROMPTS[2], times, max_tokens=120, temperature=0,
                                   ignore_eos=True, logprobs=True))

    threads = [threading.Thread(target=decoding_stream, args=(times,)) for times in progress]
    for t in threads:
        t.start()
    # both decoding (two tokens each), not just admitted
    wait_for(lambda: all(len(times) >= 2 for times in progress), "the two streams are not decoding")
    sent = time.monotonic()
    long = stream_chat(server.url, model, long_prompt, max_tokens=2, temperature=0)
    first_token = long["times"][0] if long["times"] else time.monotonic()
    ttft = first_token - sent
    for t in threads:
        t.join(timeout=300)
    assert long["usage"]["prompt_tokens"] > 1200
    for got in results:
        assert got["usage"]["completion_tokens"] == 120
        times = got["times"]
        assert len(times) == 120, "some tokens shared a chunk, so a gap may span several steps"
        gaps = [b - a for a, b in zip(times, times[1:]) if a >= sent - 0.5 and b <= first_token + 0.5]
        assert gaps, "the long prompt was not prefilled while this stream was running"
        assert max(gaps) < ttft / 2, f"a stream stalled {max(gaps):.2f} s; the long prompt's TTFT was {ttft:.2f} s"


@pytest.mark.parametrize("model", GENERATIVE)
def test_a_seeded_sampled_request_repeats_inside_a_batch(server, model):
    fields = dict(max_tokens=16, temperature=0.9, seed=1234)
    alone = stream_chat(server.url, model, PROMPTS[3], **fields)
    with cf.ThreadPoolExecutor(6) as pool:
        seeded = [pool.submit(stream_chat, server.url, model, PROMPTS[3], **fields) for _ in range(3)]
        noise = [pool.submit(stream_chat, server.url, model, PROMPTS[i], max_tokens=16, temperature=1.0)
                 for i in range(3)]
        cf.wait(noise)
        texts = [f.result()["text"] for f in seeded]
    assert texts == [alone["text"]] * 3


def test_concurrent_embedding_requests_share_forward_passes_and_match_single_answers(server, http):
    texts = [f"sentence number {i} about cats and dogs" for i in range(24)]
    single = http.post("/v1/embeddings", json={"model": "minilm", "input": texts[0]}).json()
    before = http.get("/v1/models/minilm").json()["embedding_batches"]
    with cf.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda t: http.post("/v1/embeddings", json={"model": "minilm", "input": t}).json(),
                                texts))
    passes = http.get("/v1/models/minilm").json()["embedding_batches"] - before
    assert passes < len(texts), "every request ran its own forward pass"
    first = answers[0]
    assert first["usage"] == single["usage"]
    diff = max(abs(a - b) for a, b in zip(first["data"][0]["embedding"], single["data"][0]["embedding"]))
    assert diff < 1e-4
    assert all(len(a["data"]) == 1 and len(a["data"][0]["embedding"]) == 384 for a in answers)


async def test_a_request_cancelled_while_another_prompt_is_prefilled_is_not_in_the_next_forward_pass():
    """The Transformers loop frees a cancelled request's place after the forward pass in flight,
    not at the end of its step: a step that prefills new prompts and then decodes is several
    forward passes long (here, in-process on the real alias, the prefill is held until the
    client of the decoding request has left; the decode right after it must not include it)."""
    from backends.base import SamplingParams
    from llmserve.config import load_settings
    from llmserve.manager import make_backend

    backend = make_backend("smollm2-hf", load_settings().models["smollm2-hf"])
    await backend.load()
    forward, rows_decoded, rows_held = backend.model.forward, [], []
    in_prefill, release = threading.Event(), threading.Event()

    def watched(*args, **kwargs):  # on the engine thread
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1 and not release.is_set():  # the second request's prefill: held
            rows_held.append(len(backend.batcher.rows))
            in_prefill.set()
            release.wait(BOUND)
        elif ids.shape[1] == 1 and release.is_set():
            rows_decoded.append(ids.shape[0])
        return forward(*args, **kwargs)

    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    leaving = backend.generate(await backend.encode_chat([{"role": "user", "content": PROMPTS[0]}]), params)
    staying = backend.generate(await backend.encode_chat([{"role": "user", "content": PROMPTS[1]}]), params)
    first = None
    try:
        await leaving.__anext__()  # decoding now
        backend.model.forward = watched
        first = asyncio.ensure_future(staying.__anext__())
        assert await asyncio.to_thread(in_prefill.wait, BOUND), "the second prompt was not prefilled"
        assert rows_held == [1], "the leaving request was not in the batch while the other prompt was prefilled"
        await leaving.aclose()  # the client left while the other prompt's forward pass runs
        release.set()
        async with asyncio.timeout(BOUND):
            await first
            while not rows_decoded:
                await asyncio.sleep(0.01)
        assert rows_decoded[0] == 1, f"the first decode after the prefill ran {rows_decoded[0]} rows"
    finally:
        release.set()
        if first is not None:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
        await staying.aclose()
        await leaving.aclose()
        backend.model.forward = forward
        await backend.unload()
