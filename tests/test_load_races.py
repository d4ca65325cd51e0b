"""Loading models under limits, on a `bentoml serve` of its own where one model fits
(limits.max_loaded_models 1), on-demand loads need an admin key, and one browser origin may
call it (CORS): loads and evictions of different aliases never overlap, a request for an
alias being unloaded waits and loads it once, and a browser's preflight passes."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import httpx
import pytest

from tests.conftest import BOUND, ROOT, start_server, wait_for
from tests.test_disconnects import counts, send_and_keep_open
from tests.test_errors import assert_openai_error

INFERENCE, ADMIN = "race-inf-key", "race-adm-key"
ORIGIN = "https://app.example"
LOG = ROOT / ".cache" / "test-server-races.log"
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def races():
    server = start_server({
        "LLMSERVE_LIMITS__MAX_LOADED_MODELS": "1",
        "LLMSERVE_MODELS__MINILM__PRELOAD": "false",
        "LLMSERVE_API_KEYS": INFERENCE,
        "LLMSERVE_ADMIN_KEYS": ADMIN,
        "LLMSERVE_LIMITS__LOAD_ON_DEMAND_REQUIRES_ADMIN": "true",
        "LLMSERVE_LIMITS__DRAIN_TIMEOUT": "20",  # the unload is seen draining even on a busy machine
        "LLMSERVE_CORS_ORIGINS": f'["{ORIGIN}"]',
    }, name="test-server-races")
    yield server
    server.stop()


def client(server, key=ADMIN):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def loaded(server) -> list[str]:
    return [m["id"] for m in client(server).get("/models").json()["data"] if m["loaded"] or m["loading"]]


def test_two_aliases_loading_at_once_never_pass_max_loaded_models(races):
    assert loaded(races) == ["smollm2"]  # preloaded
    most, stop = [1], threading.Event()

    def watch():  # what /models shows while the loads run
        while not stop.is_set():
            most[0] = max(most[0], len(loaded(races)))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with cf.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda alias: client(races).post(f"/models/{alias}/load"),
                                    ["minilm", "smollm2-embed"]))
    finally:
        stop.set()
        watcher.join()
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert len(loaded(races)) == 1 and most[0] == 1, f"{most[0]} models loaded or loading at once"


def test_a_request_for_an_alias_being_unloaded_waits_for_the_unload_and_loads_it_once(races):
    admin = client(races)
    assert admin.post("/models/smollm2/load").status_code == 200
    loads_before = LOG.read_text().count("] loaded smollm2 (")
    streaming = threading.Thread(target=lambda: admin.post("/v1/chat/completions", json={
        **CHAT, "max_tokens": 1500, "ignore_eos": True, "stream": True}))
    streaming.start()
    wait_for(lambda: admin.get("/models/smollm2").json().get("running_requests"), "the stream never started")
    # the unload drains the stream for up to limits.drain_timeout (20 s); requests come meanwhile
    with cf.ThreadPoolExecutor(4) as pool:
        unloading = pool.submit(admin.post, "/models/smollm2/unload")
        # well within the 20 s drain, so the unload is still draining after it
        wait_for(lambda: not admin.get("/models/smollm2").json()["loaded"], "the unload never started", bound=10)
        assert not unloading.done(), "the unload should still be draining the stream"
        answers = list(pool.map(lambda _: client(races).post("/v1/chat/completions", json=CHAT), range(3)))
        assert unloading.result().json()["was_loaded"] is True
    streaming.join(timeout=60)
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    log = LOG.read_text()
    assert log.count("] loaded smollm2 (") == loads_before + 1, "the alias should load once for all three"
    assert log.rindex("unloaded smollm2") < log.rindex("loading smollm2"), "the load must wait for the unload"


def test_a_load_waits_for_a_draining_model_to_give_its_engine_up_before_passing_max_loaded_models(races):
    """max_loaded_models 1: smollm2-hf (Transformers) is unloaded while it streams, so it drains
    (for up to 20 s), its engine still holding its memory. A request for minilm meanwhile waits
    until that engine is gone before minilm loads; /models shows smollm2-hf unloading, not loaded."""
    admin, draining = client(races), "smollm2-hf"
    assert admin.post(f"/models/{draining}/load").status_code == 200
    stop, chunks = threading.Event(), [0]

    def stream():  # leaves once told to: the server sees the client go, so the drain ends
        with client(races).stream("POST", "/v1/chat/completions", json={
                **CHAT, "model": draining, "max_tokens": 1500, "ignore_eos": True, "stream": True}) as r:
            for _ in r.iter_lines():
                chunks[0] += 1
                if stop.is_set():
                    break

    row = lambda alias: admin.get(f"/models/{alias}").json()  # noqa: E731
    streaming = threading.Thread(target=stream)
    streaming.start()
    try:
        wait_for(lambda: row(draining).get("running_requests"), "the stream never started")
        with cf.ThreadPoolExecutor(2) as pool:
            unloading = pool.submit(admin.post, f"/models/{draining}/unload")
            wait_for(lambda: not row(draining)["loaded"], "the unload never started", bound=10)
            embed = pool.submit(admin.post, "/v1/embeddings", json={"model": "minilm", "input": "a cat"})
            waits = f"loading minilm waits for the unload of {draining}"
            wait_for(lambda: waits in LOG.read_text() or embed.done(), "minilm's load never looked for room")
            assert not embed.done(), f"minilm loaded beside {draining}'s draining engine: {embed.result().status_code}"
            shown = row(draining)
            assert shown["unloading"] and not shown["loaded"] and shown["in_use"] == 1, shown
            assert not row("minilm")["loaded"] and not row("minilm")["loading"]
            assert not unloading.done() and chunks[0] > 0
            stop.set()  # the stream ends, so does the drain; then minilm loads
            assert embed.result(timeout=BOUND).status_code == 200, embed.result().text
            assert unloading.result(timeout=BOUND).json()["was_loaded"] is True
    finally:
        stop.set()
        streaming.join(timeout=BOUND)
    log = LOG.read_text()
    assert log.rindex(f"unloaded {draining}") < log.rindex("loading minilm ("), f"minilm loaded beside {draining}"
    assert loaded(races) == ["minilm"] and not row(draining)["unloading"]


def test_on_demand_loading_can_be_restricted_to_admin_keys(races):
    admin, inference = client(races), client(races, INFERENCE)
    admin.post("/models/minilm/unload")
    body = {"model": "minilm", "input": "a cat"}
    assert_openai_error(inference.post("/v1/embeddings", json=body), 403, param="model", code="model_not_loaded",
                        contains="load_on_demand_requires_admin")
    assert_openai_error(inference.post("/embed", json=body), 403, code="model_not_loaded")  # BentoML's API too
    assert not admin.get("/models/minilm").json()["loaded"]
    assert admin.post("/v1/embeddings", json=body).status_code == 200  # an admin's request loads it
    assert inference.post("/v1/embeddings", json=body).status_code == 200  # loaded: anyone may use it


OPENAI_JS_HEADERS = ("authorization,content-type,openai-organization,openai-project,x-stainless-arch,"
                     "x-stainless-lang,x-stainless-os,x-stainless-package-version,x-stainless-retry-count,"
                     "x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout")


def test_a_browser_preflight_with_the_openai_js_clients_headers_passes_for_a_configured_origin(races):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": OPENAI_JS_HEADERS}
    r = httpx.options(f"{races.url}/v1/chat/completions", headers=preflight)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    allowed = r.headers["access-control-allow-headers"].lower()
    assert all(h in allowed for h in OPENAI_JS_HEADERS.split(",")), allowed
    r = httpx.options(f"{races.url}/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    answer = client(races, INFERENCE).get("/v1/models", headers={"Origin": ORIGIN})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN


# on the session's server (room for several models, no keys)
SESSION_LOG = ROOT / ".cache" / "test-server.log"


def test_a_failing_load_wanted_by_several_requests_runs_once_and_fails_them_all(http):
    """llama3-8b has no weights here: its load fails. Four requests come while another load
    holds the manager's lock, so they all wait for the one load of llama3-8b and get its
    failure together, instead of retrying it one after another. The load that holds the lock
    is a vLLM engine's start (~20 s on 2 cores); it stays loaded for tests/test_tools.py."""
    slow, failing = "smollm2-vllm-tools", "llama3-8b"
    assert http.post(f"/models/{slow}/unload").status_code == 200
    attempts = SESSION_LOG.read_text().count(f"loading {failing} (")
    with cf.ThreadPoolExecutor(5) as pool:
        holding = pool.submit(http.post, f"/models/{slow}/load", timeout=300)
        wait_for(lambda: http.get(f"/v1/models/{slow}").json()["loading"] or holding.done(), f"{slow} never loading")
        answers = [pool.submit(http.post, "/v1/chat/completions", json={**CHAT, "model": failing}, timeout=300)
                   for _ in range(4)]
        answers = [a.result() for a in answers]
        assert holding.result().status_code == 200
    assert len({(r.status_code, r.json()["error"]["message"]) for r in answers}) == 1, [r.text for r in answers]
    assert answers[0].status_code >= 500 and failing in answers[0].json()["error"]["message"]
    assert SESSION_LOG.read_text().count(f"loading {failing} (") == attempts + 1, "the failing load ran more than once"


def test_loading_a_loaded_alias_answers_at_once_while_another_alias_drains(server, http):
    draining, loaded = "smollm2-hf", "smollm2"
    assert http.post(f"/models/{draining}/load", timeout=300).status_code == 200
    assert http.post(f"/models/{loaded}/load", timeout=300).status_code == 200
    sock = send_and_keep_open(server, "/v1/chat/completions", {**CHAT, "model": draining, "max_tokens": 1500,
                                                               "ignore_eos": True, "stream": True})
    try:
        wait_for(lambda: counts(server, http, draining)["engine"] >= 1, f"{draining} did not start the stream")
        with cf.ThreadPoolExecutor(1) as pool:  # drains the stream for limits.drain_timeout (30 s)
            unloading = pool.submit(http.post, f"/models/{draining}/unload")
            wait_for(lambda: not http.get(f"/v1/models/{draining}").json()["loaded"], "the unload never started")
            assert http.post(f"/models/{loaded}/load").status_code == 200
            assert not unloading.done(), "the load of a loaded alias waited for another alias's drain"
            sock.close()  # the stream ends, so the drain does
            assert unloading.result(timeout=BOUND).json()["was_loaded"] is True
    finally:
        sock.close()
    assert http.post(f"/models/{draining}/load", timeout=300).status_code == 200  # as the other tests expect
