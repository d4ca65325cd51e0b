"""What a production user needs when clients misbehave: keys that separate inference from
model admin, admin routes that refuse bodies they do not take, a body size limit, a bound on
requests per model (429 with Retry-After), CORS off, and a SIGTERM that leaves no engine
process behind. One `bentoml serve` of its own, with keys and small limits."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import httpx
import psutil
import pytest

from tests.conftest import ROOT, has_content, start_server, wait_for
from tests.test_errors import assert_openai_error

INFERENCE, OTHER_INFERENCE, ADMIN = "inf-key-1", "inf-key-2", "adm-key-1"
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def guarded():
    server = start_server({
        "LLMSERVE_API_KEYS": f"{INFERENCE}, {OTHER_INFERENCE}",
        "LLMSERVE_ADMIN_KEYS": ADMIN,
        "LLMSERVE_LIMITS__MAX_BODY_BYTES": "65536",
        "LLMSERVE_MODELS__SMOLLM2__MAX_PENDING": "2",
        "LLMSERVE_MODELS__MINILM__PRELOAD": "false",
        "LLMSERVE_MODELS__MINILM__KEEP_ALIVE": "2",
        "LLMSERVE_LIMITS__REQUEST_TIMEOUT": "8",
        "LLMSERVE_LIMITS__DRAIN_TIMEOUT": "1",
    }, name="test-server-guarded")
    yield server
    server.stop()


def client(server, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=120)


def test_inference_routes_need_one_of_the_keys(guarded):
    assert_openai_error(client(guarded).post("/v1/chat/completions", json=CHAT), 401, code="invalid_api_key")
    assert_openai_error(client(guarded, "wrong").post("/v1/chat/completions", json=CHAT), 401)
    for key in (INFERENCE, OTHER_INFERENCE, ADMIN):
        assert client(guarded, key).post("/v1/chat/completions", json=CHAT).status_code == 200


def test_admin_routes_refuse_inference_keys_with_403(guarded):
    assert_openai_error(client(guarded, INFERENCE).post("/models/smollm2/unload"), 403,
                        code="insufficient_permissions", contains="admin key")
    assert_openai_error(client(guarded).post("/v1/models/smollm2/load"), 401)
    assert client(guarded, INFERENCE).get("/models").status_code == 200  # reading the list is inference's
    assert client(guarded, ADMIN).post("/models/smollm2/load").status_code == 200


def test_anthropics_clients_send_the_same_keys_as_x_api_key_and_are_refused_in_its_shape(guarded):
    import anthropic

    body = {"model": "smollm2", "max_tokens": 2, "messages": CHAT["messages"]}
    for key in (None, "wrong"):
        r = httpx.post(f"{guarded.url}/v1/messages", json=body, headers={"x-api-key": key} if key else {})
        assert r.status_code == 401 and r.json()["type"] == "error", r.text
        assert r.json()["error"]["type"] == "authentication_error" and "x-api-key" in r.json()["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=guarded.url, api_key="wrong", max_retries=0).messages.create(**body)
    for key in (INFERENCE, ADMIN):  # the SDK sends its key as x-api-key
        m = anthropic.Anthropic(base_url=guarded.url, api_key=key, max_retries=0).messages.create(**body)
        assert m.usage.output_tokens > 0
    assert client(guarded, INFERENCE).post("/v1/messages", json=body).status_code == 200  # Bearer works too
    assert httpx.post(f"{guarded.url}/messages", json=body).status_code == 401  # the native API
    assert httpx.post(f"{guarded.url}/messages", json=body, headers={"x-api-key": INFERENCE}).status_code == 200
    big = {**body, "messages": [{"role": "user", "content": "x" * 70_000}]}  # past the 64 KiB body limit
    for path in ("/v1/messages", "/messages"):
        r = httpx.post(f"{guarded.url}{path}", json=big, headers={"x-api-key": INFERENCE})
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large", r.text


def test_bentomls_native_apis_take_the_same_keys(guarded):
    assert client(guarded).post("/chat", json=CHAT).status_code == 401
    assert client(guarded, INFERENCE).post("/load_model", json={"name": "smollm2"}).status_code == 403
    assert client(guarded, ADMIN).post("/load_model", json={"name": "smollm2"}).status_code == 200


def test_keys_never_reach_the_log(guarded):
    client(guarded, "wrong-key-xyz").post("/v1/chat/completions", json=CHAT)
    log = (ROOT / ".cache" / "test-server-guarded.log").read_text()
    assert not [k for k in (INFERENCE, OTHER_INFERENCE, ADMIN, "wrong-key-xyz") if k in log]


@pytest.mark.parametrize("body, param", [
    ({"backend": "no-such-engine"}, "backend"),
    ({"config": {"n_ctx": -5}}, "config"),
    ([1, 2], None),
])
def test_load_refuses_a_body_it_does_not_take_naming_it(guarded, body, param):
    r = client(guarded, ADMIN).post("/models/smollm2/load", json=body)
    err = assert_openai_error(r, 400, param=param, code="unexpected_body")
    assert param is None or param in err["message"]


def test_load_refuses_broken_json_and_takes_an_empty_object(guarded):
    admin = client(guarded, ADMIN)
    r = admin.post("/models/smollm2/load", content=b'{"backend": ', headers={"content-type": "application/json"})
    assert_openai_error(r, 400, code="invalid_json")
    assert admin.post("/models/smollm2/load", json={}).status_code == 200


def test_a_body_over_the_limit_is_413_and_the_server_goes_on(guarded):
    inf = client(guarded, INFERENCE)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 70_000}]}
    assert_openai_error(inf.post("/v1/chat/completions", json=big), 413, code="request_too_large")

    def chunks():  # no Content-Length: counted as it streams in
        yield b'{"model": "smollm2", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"y" * 4096
        yield b'"}]}'

    r = inf.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413, code="request_too_large")
    assert inf.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_past_max_pending_a_model_answers_429_with_retry_after_and_serves_the_rest(guarded):
    body = {**CHAT, "max_tokens": 48, "ignore_eos": True}

    def one(_):
        return client(guarded, INFERENCE).post("/v1/chat/completions", json=body)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    refused = [r for r in answers if r.status_code == 429]
    served = [r for r in answers if r.status_code == 200]
    assert len(refused) + len(served) == 8 and len(served) >= 2 and refused
    for r in refused:
        assert_openai_error(r, 429, code="rate_limit_exceeded", contains="max_pending")
        assert int(r.headers["retry-after"]) >= 1
    for r in served:
        assert r.json()["usage"]["completion_tokens"] == 48
    assert client(guarded, INFERENCE).post("/v1/chat/completions", json=CHAT).status_code == 200


def test_a_generation_past_request_timeout_ends_with_504_and_frees_its_place(guarded):
    inf = client(guarded, INFERENCE)
    body = {**CHAT, "max_tokens": 2000, "ignore_eos": True}  # ~20 s or more on 2 cores
    started = time.monotonic()
    r = inf.post("/v1/chat/completions", json=body)
    assert_openai_error(r, 504, code="timeout", contains="request_timeout")
    assert 7.5 < time.monotonic() - started < 20
    with inf.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert '"timeout"' in events[-2] and events[-1] == "data: [DONE]"
    wait_for(lambda: inf.get("/models/smollm2").json()["running_requests"] == 0, "the timed-out stream kept its place")


def test_an_idle_model_unloads_after_its_keep_alive_and_loads_again_on_demand(guarded):
    inf = client(guarded, INFERENCE)
    assert inf.post("/v1/embeddings", json={"model": "minilm", "input": "a cat"}).status_code == 200
    assert inf.get("/models/minilm").json()["loaded"] is True
    wait_for(lambda: inf.get("/models/minilm").json()["loaded"] is False, "minilm stayed loaded (keep_alive 2 s)")
    log_path = ROOT / ".cache" / "test-server-guarded.log"
    # the line comes once the engine has let go, after the list says unloaded
    wait_for(lambda: "unloaded minilm (idle for" in log_path.read_text(), "the idle unload was not logged")
    assert inf.post("/v1/embeddings", json={"model": "minilm", "input": "a dog"}).status_code == 200


def test_an_unload_under_load_ends_what_outlives_the_drain_with_an_error_and_the_model_loads_again(guarded):
    import threading

    inf, admin = client(guarded, INFERENCE), client(guarded, ADMIN)
    events: list[str] = []

    def long_stream():
        body = {**CHAT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with inf.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)

    streaming = threading.Thread(target=long_stream)
    streaming.start()
    # mid-stream (a token sent, not just the role chunk): the engine is generating
    wait_for(lambda: any(map(has_content, events)), "the stream sent no token")
    started = time.monotonic()
    assert admin.post("/models/smollm2/unload").json()["was_loaded"] is True
    assert time.monotonic() - started < 5  # drain_timeout 1 s, then the unload
    streaming.join(timeout=30)
    assert not streaming.is_alive()
    assert "unloaded while this request ran" in events[-2] and events[-1] == "data: [DONE]"
    # load_on_demand: the next request brings it back
    assert inf.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_a_stall_past_stall_timeout_ends_the_generation_naming_the_setting():
    """In-process on llama.cpp: a stall_timeout shorter than the gap between two tokens."""
    import asyncio

    from llmserve.config import load_settings
    from llmserve.errors import APIError
    from llmserve.manager import ModelManager
    from llmserve.serving import OpenAIOperations
    from llmserve.schemas import ChatCompletionRequest

    async def run():
        settings = load_settings()
        settings.limits.stall_timeout = 0.001
        manager = ModelManager(settings)
        try:
            await manager.load("smollm2")
            ops = OpenAIOperations(manager, settings)
            with pytest.raises(APIError) as stalled:
                await ops.chat(ChatCompletionRequest.model_validate({**CHAT, "max_tokens": 64}))
            assert stalled.value.status == 504 and "limits.stall_timeout" in stalled.value.message
            backend = manager.loaded["smollm2"]
            # the step loop frees the slot of a cancelled request at its next step (bounded: a step
            # on a busy 2-core machine can take seconds)
            for _ in range(600):
                if backend.running_requests() == 0:
                    break
                await asyncio.sleep(0.05)
            assert backend.running_requests() == 0
        finally:
            await manager.shutdown()

    asyncio.run(run())


def test_cors_is_off_unless_configured(guarded):
    r = client(guarded, INFERENCE).get("/v1/models", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_sigterm_leaves_no_engine_process_behind():
    """The server's own SIGTERM path (not the launcher's process-group kill): BentoML's
    processes and the engines' threads end, nothing is left running."""
    server = start_server({"LLMSERVE_MODELS__MINILM__PRELOAD": "false"}, name="test-server-sigterm")
    try:
        r = httpx.post(f"{server.url}/models/smollm2-hf/load", timeout=300)
        assert r.status_code == 200
        family = [psutil.Process(p) for p in server.pids()]
        assert len(family) > 1
        # a stream running when SIGTERM comes is let finish (limits.drain_timeout)
        import threading

        events: list[str] = []

        def stream():
            body = {**CHAT, "max_tokens": 24, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as s:
                for line in s.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)

        streaming = threading.Thread(target=stream)
        streaming.start()
        wait_for(lambda: any(map(has_content, events)), "the stream sent no token")
        os.kill(server.proc.pid, signal.SIGTERM)
        streaming.join(timeout=60)
        assert events and events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2], events[-3:]
        server.proc.wait(timeout=60)
        def left() -> list[int]:
            return [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

        wait_for(lambda: not left(), "processes were left after SIGTERM")
    finally:
        server.stop()


async def test_past_the_memory_budget_an_idle_model_is_evicted_first_and_a_load_that_cannot_fit_is_refused():
    """In-process, real engines: the budget is set from this process's own memory, so that
    loading minilm only fits once the idle smollm2 is unloaded; then a budget nothing fits in."""
    from llmserve.config import load_settings
    from llmserve.errors import APIError
    from llmserve.logs import rss_bytes
    from llmserve.manager import ModelManager

    manager = ModelManager(load_settings())
    try:
        await manager.load("smollm2")
        need = manager._expected_memory("minilm")
        # 1 MiB short (not one byte: the process's RSS may shrink a few pages before it is read again)
        manager.settings.limits.memory_budget_bytes = rss_bytes() + need - 2**20
        await manager.load("minilm")
        assert set(manager.loaded) == {"minilm"}, "smollm2 (idle) should have made room"
        manager.settings.limits.memory_budget_bytes = 1
        with pytest.raises(APIError) as refused:
            await manager.load("smollm2")
        assert refused.value.status == 507 and refused.value.code == "memory_budget"
        assert "limits.memory_budget_bytes" in refused.value.message
        assert set(manager.loaded) == set()  # minilm was idle, so it went first; still no room
    finally:
        await manager.shutdown()


def test_bentomls_native_apis_have_the_same_body_limit(guarded):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 70_000}]}
    for route in ("/chat", "/complete", "/embed"):
        assert_openai_error(client(guarded, INFERENCE).post(route, json=big), 413, code="request_too_large")
    assert client(guarded, INFERENCE).post("/chat", json=CHAT).status_code == 200


def test_without_keys_the_server_warns_at_start_naming_where_it_listens(server, guarded):
    warning = "no API key is set"
    log = (ROOT / ".cache" / "test-server.log").read_text()
    lines = [line for line in log.splitlines() if warning in line]
    assert lines and f"127.0.0.1:{server.port}" in lines[0] and "WARNING" in lines[0].upper(), lines
    assert warning not in (ROOT / ".cache" / "test-server-guarded.log").read_text()  # keys set: no warning


async def test_an_unexpected_error_is_a_500_with_an_error_id_and_no_exception_text(caplog):
    import json as _json

    from starlette.requests import Request

    from llmserve.web.app import _error

    request = Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []})
    with caplog.at_level("ERROR", logger="llmserve"):
        response = await _error(request, RuntimeError("secret detail /etc/passwd"))
    err = _json.loads(response.body)["error"]
    assert response.status_code == 500 and err["type"] == "server_error" and err["code"] == "internal_error"
    assert "secret detail" not in response.body.decode() and "RuntimeError" not in response.body.decode()
    error_id = err["message"].split("error id ")[1].split(";")[0]
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and "secret detail" in caplog.text  # the text goes to the log, with the id


def test_cors_preflight_is_refused_unless_configured(guarded):
    r = httpx.options(f"{guarded.url}/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert "access-control-allow-origin" not in r.headers


def test_the_index_page_lists_models_only_to_a_caller_that_may_list_them(guarded):
    anonymous = client(guarded).get("/")
    assert anonymous.status_code == 200
    assert "smollm2" not in anonymous.text and "SmolLM2" not in anonymous.text  # no alias, no description
    assert "GET /v1/models" in anonymous.text  # says how to see them
    keyed = client(guarded, INFERENCE).get("/")
    assert "<code>smollm2</code>" in keyed.text and "<code>minilm</code>" in keyed.text
