"""The official openai client against a real `bentoml serve`, on every generative backend."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from conftest import ALL_GENERATIVE, GENERATIVE, wait_for

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize("model", GENERATIVE)
def test_chat_non_streaming(oai, model):
    r = oai.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.created > 0
    assert r.model == model
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_transformers_answers_paris_in_float32(oai):
    # ENVIRONMENT.md: fp32 Transformers answers this correctly with greedy decoding
    r = oai.chat.completions.create(model="smollm2-hf", messages=QUESTION, max_tokens=16, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("model", GENERATIVE)
def test_chat_streaming_matches_non_streaming(oai, model):
    full = oai.chat.completions.create(model=model, messages=QUESTION, max_tokens=10, temperature=0)
    stream = oai.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, roles = [], None, None, []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk" and chunk.model == model
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                pieces.append(c.delta.content)
            finish = c.finish_reason or finish
    assert roles == ["assistant"]
    assert len(pieces) > 1, "tokens must arrive as separate chunks"
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


@pytest.mark.parametrize("model", GENERATIVE)
def test_completion_and_max_tokens(oai, model):
    r = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=7, temperature=0)
    assert r.object == "text_completion" and r.model == model
    assert r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7


@pytest.mark.parametrize("model", GENERATIVE)
def test_completion_streaming(oai, model):
    stream = oai.completions.create(model=model, prompt="The sky is", max_tokens=6, temperature=0, stream=True)
    texts, finish = [], None
    for chunk in stream:
        texts.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(texts).strip() and finish == "length"


@pytest.mark.parametrize("model", GENERATIVE)
def test_stop_sequence_cuts_the_text(oai, model):
    base = oai.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    # stop at the second non-space character of the greedy answer: it must not appear
    stop = text.strip()[1:3] if len(text.strip()) > 3 else text.strip()[:1]
    cut = oai.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text
    assert text.startswith(cut.choices[0].text)
    assert cut.usage.completion_tokens < base.usage.completion_tokens


@pytest.mark.parametrize("model", GENERATIVE)
def test_seed_makes_sampling_repeatable(oai, model):
    def sample(seed):
        r = oai.completions.create(model=model, prompt="My favourite animal is", max_tokens=12,
                                   temperature=1.0, seed=seed)
        return r.choices[0].text

    a, b = sample(1234), sample(1234)
    assert a == b
    others = {sample(s) for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds should not all give the same sample"


def test_models_list(oai):
    models = {m.id: m for m in oai.models.list().data}
    assert {"smollm2", "smollm2-hf", "minilm", "smollm2-embed", "llama3-8b", "llama3-70b"} <= set(models)
    assert models["smollm2"].model_extra["backend"] == "llamacpp"
    assert models["minilm"].model_extra["backend"] == "transformers"
    assert models["llama3-70b"].model_extra["backend"] == "vllm"
    assert models["smollm2"].model_extra["loaded"] is True
    assert models["llama3-8b"].model_extra["loaded"] is False


@pytest.mark.parametrize("model,dims", [("minilm", 384), ("smollm2-embed", 576)])
def test_embeddings(oai, model, dims):
    r = oai.embeddings.create(model=model, input=["a cat sat on the mat", "a kitten sits on a rug",
                                                  "stock markets fell sharply"])
    vecs = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(len(v) == dims for v in vecs)
    assert r.usage.prompt_tokens > 6
    norm = sum(x * x for x in vecs[0]) ** 0.5
    assert abs(norm - 1) < 1e-3


def test_minilm_embeddings_are_semantic(oai):
    r = oai.embeddings.create(model="minilm", input=["a cat sat on the mat", "a kitten sits on a rug",
                                                     "stock markets fell sharply"])
    a, b, c = (d.embedding for d in r.data)
    dot = lambda x, y: sum(p * q for p, q in zip(x, y))  # noqa: E731
    assert dot(a, b) > dot(a, c) + 0.2


def test_requests_without_model_use_the_configured_defaults(http):
    r = http.post("/v1/embeddings", json={"input": "hello"}).json()
    assert r["model"] == "minilm" and len(r["data"][0]["embedding"]) == 384
    r = http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2}).json()
    assert r["model"] == "smollm2"


def test_embeddings_base64(oai):
    import base64
    import struct

    packed = oai.embeddings.create(model="minilm", input="hello", encoding_format="base64").data[0].embedding
    floats = oai.embeddings.create(model="minilm", input="hello").data[0].embedding
    decoded = struct.unpack("<384f", base64.b64decode(packed))
    assert max(abs(a - b) for a, b in zip(decoded, floats)) < 1e-6


def test_api_v1_prefix_serves_the_same_routes(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/api/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert client.completions.create(model="smollm2", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
    assert len(client.embeddings.create(model="minilm", input="hi").data[0].embedding) == 384
    assert "smollm2" in {m.id for m in client.models.list().data}


@pytest.mark.parametrize("model,n", [("smollm2", 8), ("smollm2-hf", 4)])
def test_concurrent_streams_all_complete_with_own_usage(oai, model, n):
    """n streams at once: each gets exactly what it gets alone (greedy), usage included."""
    jobs = [(f"Count from {i} to {i + 20}:", 6 + i) for i in range(n)]

    def stream(job):
        prompt, max_tokens = job
        chunks = oai.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                        stream=True, stream_options={"include_usage": True})
        text, usage = [], None
        for chunk in chunks:
            usage = chunk.usage or usage
            text.extend(c.text for c in chunk.choices)
        return "".join(text), usage

    with cf.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(stream, jobs))
    for (prompt, max_tokens), (text, usage) in zip(jobs, results):
        alone = oai.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        assert text == alone.choices[0].text, prompt
        assert usage.prompt_tokens == alone.usage.prompt_tokens
        assert usage.completion_tokens == alone.usage.completion_tokens <= max_tokens


def test_event_loop_stays_free_during_generation(server, oai):
    """While a long Transformers generation runs, other routes answer at once."""
    with cf.ThreadPoolExecutor(1) as pool:
        long = pool.submit(oai.completions.create, model="smollm2-hf", prompt="Write a long story:",
                           max_tokens=120, temperature=0)
        wait_for(lambda: httpx.get(f"{server.url}/v1/models/smollm2-hf").json()["running_requests"] == 1,
                 "the long generation did not start")
        started = time.monotonic()
        r = httpx.get(f"{server.url}/v1/models", timeout=30)
        quick = time.monotonic() - started
        assert r.status_code == 200
        assert not long.done(), "the long request should still be running"
        assert quick < 1.0, f"/v1/models took {quick:.2f} s while a generation ran"
        assert long.result().usage.completion_tokens > 0


def _text_before_finish(chunks, chat: bool) -> tuple[dict[int, str], dict[int, object]]:
    """Per choice: the text of the chunks whose finish_reason is null (what a client that reads
    text only from those gets), and the finishing chunk itself."""
    texts: dict[int, str] = {}
    finishing: dict[int, object] = {}
    for chunk in chunks:
        for c in chunk.choices:
            assert c.index not in finishing, "a chunk came for a choice after its finish chunk"
            piece = (c.delta.content if chat else c.text) or ""
            if c.finish_reason is None:
                texts[c.index] = texts.get(c.index, "") + piece
            else:
                finishing[c.index] = c
    return texts, finishing


@pytest.mark.parametrize("model", ALL_GENERATIVE)
@pytest.mark.parametrize("extra", [{}, {"n": 2}, {"logprobs": True}], ids=["plain", "n=2", "logprobs"])
def test_chat_finish_reason_comes_in_a_chunk_of_its_own_after_the_last_text(oai, request, model, extra):
    if model == "smollm2-vllm":
        request.getfixturevalue("vllm_loaded")
    full = oai.chat.completions.create(model=model, messages=QUESTION, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    stream = oai.chat.completions.create(model=model, messages=QUESTION, max_tokens=6, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True}, **extra)
    texts, finishing = _text_before_finish(stream, chat=True)
    assert set(finishing) == set(range(extra.get("n", 1)))
    for i, c in finishing.items():
        assert c.finish_reason == "length"
        assert not c.delta.content and not c.delta.tool_calls, "the finish chunk has an empty delta"
        assert texts[i] == full.choices[0].message.content  # greedy: every choice the same


@pytest.mark.parametrize("model", ALL_GENERATIVE)
@pytest.mark.parametrize("extra", [{}, {"echo": True}], ids=["plain", "echo"])
def test_completion_finish_reason_comes_in_a_chunk_of_its_own_after_the_last_text(oai, request, model, extra):
    if model == "smollm2-vllm":
        request.getfixturevalue("vllm_loaded")
    full = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    stream = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0,
                                    stream=True, extra_body={"ignore_eos": True}, **extra)
    texts, finishing = _text_before_finish(stream, chat=False)
    assert finishing[0].finish_reason == "length" and finishing[0].text == ""
    assert texts[0] == ("Once upon a time" if extra else "") + full.choices[0].text
