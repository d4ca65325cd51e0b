"""A client that leaves ends its engine work and every count it raised, on every path.

Each test sends a long generation on the session's server (raw socket: nothing buffers or
retries), waits until the engine works on it, closes the connection, then waits, with a bound
that holds on a busy 2-core machine, until the engine, the manager's in-use count and the
`llm_requests_running` gauge are all back at zero. On Transformers a generation left running
would take minutes (1,500 tokens at ~15 tokens/s), far past the bound.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from conftest import GENERATIVE, wait_for

LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0.8}
CHAT = {"messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}], **LONG}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}]

MESSAGES = {"messages": CHAT["messages"], "max_tokens": 1500, "temperature": 0.8}

PATHS = {
    # path name -> (route, body): each takes a different way through the front end
    "plain": ("/v1/chat/completions", {**CHAT, "stream": True}),
    "n>1": ("/v1/chat/completions", {**CHAT, "stream": True, "n": 2}),
    "logprobs": ("/v1/chat/completions", {**CHAT, "stream": True, "logprobs": True, "top_logprobs": 2}),
    "tools": ("/v1/chat/completions", {**CHAT, "stream": True, "tools": TOOLS, "tool_choice": "auto"}),
    "echo": ("/v1/completions", {"prompt": "Once upon a time", **LONG, "stream": True, "echo": True}),
    "non-streamed": ("/v1/chat/completions", CHAT),
    "non-streamed n>1": ("/v1/completions", {"prompt": "Once upon a time", **LONG, "n": 2}),
    # Anthropic's Messages API, a front on the chat operation (no ignore_eos there: the story runs long)
    "anthropic stream": ("/v1/messages", {**MESSAGES, "stream": True}),
    "anthropic non-streamed": ("/v1/messages", MESSAGES),
    # BentoML's native APIs (service.py): the same operations behind BentoML's own routes
    "native non-streamed": ("/chat", CHAT),
    "native non-streamed completion": ("/complete", {"prompt": "Once upon a time", **LONG}),
}


@pytest.fixture(scope="module", autouse=True)
def _loaded(http):
    for model in GENERATIVE:
        assert http.post(f"/models/{model}/load", timeout=300).status_code == 200


def send_and_keep_open(server, route: str, body: dict) -> socket.socket:
    """POSTs ``body`` and returns the open connection, its answer unread."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def counts(server, http, model: str) -> dict[str, float]:
    row = http.get(f"/v1/models/{model}").json()
    return {"engine": row["running_requests"], "in_use": row["in_use"],
            "gauge": server.metric("llm_requests_running", model=model)}


def idle(server, http, model: str) -> bool:
    return not any(counts(server, http, model).values())


@pytest.mark.parametrize("model", GENERATIVE)
@pytest.mark.parametrize("path", list(PATHS))
def test_a_client_that_leaves_stops_its_generation_and_every_count_returns_to_zero(server, http, model, path):
    route, body = PATHS[path]
    wait_for(lambda: idle(server, http, model), f"{model} busy before the test")
    aborted = server.metric("llm_requests_total", model=model, status="aborted")
    choices = body.get("n", 1)
    sock = send_and_keep_open(server, route, {**body, "model": model})
    try:
        wait_for(lambda: counts(server, http, model)["engine"] >= choices,
                 f"{model} did not start the {choices} generation(s) of the {path} request")
        assert counts(server, http, model)["in_use"] == 1
    finally:
        sock.close()
    wait_for(lambda: idle(server, http, model), f"{model}, {path}: a count stayed raised after the client left")
    assert server.metric("llm_requests_total", model=model, status="aborted") - aborted == choices


async def test_a_native_api_called_in_process_without_an_http_request_answers_unwatched():
    """BentoML's context has no request or response outside an HTTP call (both raise
    LookupError): the operation then runs with no client to watch and answers as over HTTP."""
    import bentoml

    import service
    from backends.errors import BadInput

    async def make():
        return {"answer": 42}

    ctx = bentoml.Context()
    response = await service.as_response(make, ctx)
    assert (response.status_code, json.loads(response.body)) == (200, {"answer": 42})

    async def refuse():
        raise BadInput("too long", param="input", code="context_length_exceeded")

    refused = await service.as_response(refuse, bentoml.Context())
    assert refused.status_code == 400 and json.loads(refused.body)["error"]["param"] == "input"


async def test_when_one_of_n_choices_fails_the_others_are_cancelled_at_once():
    """In-process, the front end's own logic (no engine can be made to fail one choice of n
    on demand yet): choice 1's generation raises, and choice 0's, which would run on for
    minutes, is closed before the error answer comes back."""
    import asyncio

    from backends.base import CHAT as CHAT_CAPABILITY, Backend, Delta
    from llmserve.config import load_settings
    from llmserve.errors import APIError
    from llmserve.manager import ModelManager
    from llmserve.serving import OpenAIOperations
    from llmserve.schemas import ChatCompletionRequest

    closed: list[int] = []

    class OneChoiceFails(Backend):
        name = "stub"
        features = frozenset({"seed"})

        async def load(self): ...
        async def unload(self): ...
        def capabilities(self): return {CHAT_CAPABILITY}
        def context_length(self): return 4096
        def running_requests(self): return 0
        async def encode_chat(self, messages): return [1, 2, 3]
        async def encode_text(self, text): return [1, 2, 3]

        async def generate(self, prompt_ids, params):
            try:
                for n in range(1, 100_000):
                    await asyncio.sleep(0.01)
                    if params.seed == 8 and n == 3:
                        raise RuntimeError("choice 1 failed")
                    yield Delta("x", n)
            finally:
                closed.append(params.seed)

    settings = load_settings()
    manager = ModelManager(settings)
    manager.loaded["smollm2"] = OneChoiceFails("smollm2", settings.models["smollm2"])
    ops = OpenAIOperations(manager, settings)
    req = ChatCompletionRequest.model_validate({**CHAT, "model": "smollm2", "n": 2, "seed": 7, "max_tokens": 4000})
    started = time.monotonic()
    with pytest.raises(APIError) as failed:
        await ops.chat(req)
    assert failed.value.status == 500 and "choice 1 failed" not in failed.value.message
    assert sorted(closed) == [7, 8], "the other choice's generation was left running"
    assert time.monotonic() - started < 5 and manager.list_models()[0]["in_use"] == 0


def test_a_responses_request_whose_client_leaves_during_an_on_demand_load_releases_everything(server, http):
    """Native /respond, streamed, on an alias that loads on demand: the client leaves while the
    load runs, so the Responses stream is closed before its first event; its in-use count and
    running gauge still return to zero (a never-started generator's finally never runs)."""
    model = "smollm2-tools"
    assert http.post(f"/models/{model}/unload").status_code == 200
    assert not http.get(f"/v1/models/{model}").json()["loaded"]
    sock = send_and_keep_open(server, "/respond", {"model": model, "input": "Write a long story.", "stream": True,
                                                    "max_output_tokens": 1500, "temperature": 0.8})
    try:
        # the load takes 0.1-0.2 s here: checked every 5 ms, or it can come and go unseen
        wait_for(lambda: http.get(f"/v1/models/{model}").json()["waiting_for_load"] >= 1,
                 f"the request did not wait for {model} to load", every=0.005)
    finally:
        sock.close()
    wait_for(lambda: http.get(f"/v1/models/{model}").json()["loaded"], f"{model} did not finish loading")
    wait_for(lambda: idle(server, http, model), f"{model}: a count stayed raised after the client left")


def test_a_non_streamed_responses_request_whose_client_leaves_stops_its_generation(server, http):
    model = "smollm2-hf"  # ~15 tokens/s: the generation is still running when the client leaves
    wait_for(lambda: idle(server, http, model), f"{model} busy before the test")
    aborted = server.metric("llm_requests_total", model=model, status="aborted")
    sock = send_and_keep_open(server, "/v1/responses", {"model": model, "input": "Write a very long story.",
                                                         "max_output_tokens": 1500, "temperature": 0.8})
    try:
        wait_for(lambda: counts(server, http, model)["engine"] >= 1, f"{model} did not start the generation")
    finally:
        sock.close()
    wait_for(lambda: idle(server, http, model), f"{model}: a count stayed raised after the client left")
    assert server.metric("llm_requests_total", model=model, status="aborted") - aborted == 1
