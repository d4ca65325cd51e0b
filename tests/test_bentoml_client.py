"""BentoML's own clients through the native APIs: chat, complete, embed, list/load/unload_model."""

from __future__ import annotations

import asyncio
import json

import bentoml
import pytest

MSG = [{"role": "user", "content": "What is the capital of France?"}]


def sse_events(chunks) -> list[dict]:
    """The JSON events of an SSE answer, however the transport split it into chunks."""
    text = "".join(chunks)
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.fixture(scope="module")
def client(server):
    with bentoml.SyncHTTPClient(server.url, timeout=120) as c:
        yield c


@pytest.mark.parametrize("model", ["smollm2", "smollm2-hf"])
def test_chat(client, model):
    body = json.loads("".join(client.chat(model=model, messages=MSG, max_tokens=8, temperature=0)))
    assert body["object"] == "chat.completion" and body["model"] == model
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] <= 8


def test_chat_streaming(client):
    events = sse_events(client.chat(model="smollm2", messages=MSG, max_tokens=8, temperature=0, stream=True,
                                    stream_options={"include_usage": True}))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text and events[-1]["usage"]["completion_tokens"] == 8


def test_chat_fields_match_the_openai_route(client, oai):
    """Same request, same greedy answer, through both surfaces."""
    args = dict(model="smollm2", messages=MSG, max_tokens=10, temperature=0, stop=["\n"], seed=7, top_p=0.9)
    body = json.loads("".join(client.chat(**args)))
    ref = oai.chat.completions.create(**args)
    assert body["choices"][0]["message"]["content"] == ref.choices[0].message.content
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert body["usage"][key] == getattr(ref.usage, key)


def test_complete(client):
    body = json.loads("".join(client.complete(model="smollm2", prompt="Once upon a time", max_tokens=5)))
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"


def test_complete_streaming(client):
    events = sse_events(client.complete(model="smollm2-hf", prompt="Once upon a time", max_tokens=5, stream=True))
    assert "".join(e["choices"][0]["text"] for e in events).strip()
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_embed(client):
    body = json.loads("".join(client.embed(model="minilm", input=["hello", "world"])))
    assert [len(d["embedding"]) for d in body["data"]] == [384, 384]


def test_errors_are_openai_shaped(client):
    with pytest.raises(bentoml.exceptions.BentoMLException) as info:
        "".join(client.chat(model="gpt-17", messages=MSG))
    assert info.value.error_code == 404
    assert "model_not_found" in str(info.value)
    with pytest.raises(bentoml.exceptions.BentoMLException) as info:
        "".join(client.embed(model="smollm2", input="hi"))
    assert info.value.error_code == 400 and "unsupported_capability" in str(info.value)


def test_model_admin(client):
    rows = {m["id"]: m for m in client.list_models()["data"]}
    assert rows["smollm2"]["loaded"] and rows["smollm2"]["backend"] == "llamacpp"
    assert client.unload_model(name="smollm2-embed")["loaded"] is False
    assert client.load_model(name="smollm2-embed")["loaded"] is True
    assert {m["id"]: m for m in client.list_models()["data"]}["smollm2-embed"]["loaded"] is True
    assert client.unload_model(name="smollm2-embed")["was_loaded"] is True
    assert {m["id"]: m for m in client.list_models()["data"]}["smollm2-embed"]["loaded"] is False
    with pytest.raises(bentoml.exceptions.BentoMLException) as info:
        client.load_model(name="gpt-17")
    assert info.value.error_code == 404


def test_async_client_concurrent_streams(server):
    async def main():
        async with bentoml.AsyncHTTPClient(server.url, timeout=120) as c:
            async def one(i):
                chunks = [x async for x in c.chat(model="smollm2", messages=[{"role": "user", "content": f"Say {i}"}],
                                                   max_tokens=6, stream=True, stream_options={"include_usage": True})]
                return sse_events(chunks)
            return await asyncio.gather(*(one(i) for i in range(6)))

    for events in asyncio.run(main()):
        assert events[-1]["usage"]["completion_tokens"] <= 6
        assert len({e["id"] for e in events}) == 1
