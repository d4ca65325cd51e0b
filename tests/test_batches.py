"""The Batch API with the official `openai` client: upload, create, poll, download, parse, on the
three engines; bad lines and unknown aliases as error lines; invalid files; cancel; expiry of the
completion window; keys that cannot see each other's files and batches; the bounds on uploads;
and a server SIGKILLed mid-batch that resumes after a restart without running a finished line
twice (the lines are read from the store the killed server left behind)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import time

import httpx
import openai
import psutil
import pytest

from conftest import BOUND, start_server, wait_for

DONE = ("completed", "failed", "expired", "cancelled")
RUN_BOUND = 180.0  # seconds a small batch may take on a busy 2-core machine (a load on demand included)


def chat_line(custom_id: str, model: str | None = "smollm2", text: str = "Say hello.", **options) -> dict:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0, **options}
    if model is not None:
        body["model"] = model
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def upload(client: openai.OpenAI, lines: list[dict] | str) -> str:
    text = lines if isinstance(lines, str) else "\n".join(json.dumps(line) for line in lines) + "\n"
    return client.files.create(file=("requests.jsonl", text.encode()), purpose="batch").id


def submit(client: openai.OpenAI, lines, endpoint: str = "/v1/chat/completions", window: str = "24h", **kw):
    return client.batches.create(input_file_id=upload(client, lines), endpoint=endpoint, completion_window=window, **kw)


def wait_batch(client: openai.OpenAI, batch_id: str, statuses=DONE, bound: float = RUN_BOUND):
    seen = {}

    def reached() -> bool:
        seen["batch"] = client.batches.retrieve(batch_id)
        return seen["batch"].status in statuses

    wait_for(reached, f"batch {batch_id} reaching {statuses}", bound, every=0.25)
    return seen["batch"]


def results(client: openai.OpenAI, batch) -> list[dict]:
    """The output and error files' lines, parsed."""
    lines = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            lines += [json.loads(t) for t in client.files.content(file_id).text.splitlines() if t.strip()]
    return lines


def by_custom_id(lines: list[dict]) -> dict[str, dict]:
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == len(set(ids)), f"a custom_id appears more than once: {sorted(ids)}"
    return {line["custom_id"]: line for line in lines}


# -- end to end on each engine ------------------------------------------------------------------
def test_a_chat_batch_runs_end_to_end_on_each_engine(oai, alias):
    prompts = {"hello": "Say hello.", "sky": "What colour is the sky?", "count": "Count to three."}
    batch = submit(oai, [chat_line(k, alias, v) for k, v in prompts.items()], metadata={"job": "e2e"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "e2e"}
    batch = wait_batch(oai, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 3, "failed": 0}
    assert batch.error_file_id is None and batch.model == alias
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at >= batch.created_at
    assert oai.files.retrieve(batch.output_file_id).purpose == "batch_output"
    lines = by_custom_id(results(oai, batch))
    assert set(lines) == set(prompts)
    for line in lines.values():
        assert line["error"] is None and line["id"].startswith("batch_req_")
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        assert body["object"] == "chat.completion" and body["model"] == alias
        assert body["choices"][0]["message"]["content"]
        assert 1 <= body["usage"]["completion_tokens"] <= 8
    assert batch.usage.output_tokens == sum(line["response"]["body"]["usage"]["completion_tokens"]
                                            for line in lines.values())


def test_completion_and_embedding_batches_answer_as_their_routes(oai):
    completions = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                    "body": {"model": "smollm2", "prompt": p, "max_tokens": 4, "temperature": 0}}
                   for i, p in enumerate(["The capital of France is", "One, two,"])]
    texts = ["a cat sat on the mat", "stock prices fell sharply"]
    embeddings = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": {"input": t}}
                  for i, t in enumerate(texts)]  # no model: embedding_model, as on the route
    done_c = wait_batch(oai, submit(oai, completions, "/v1/completions").id)
    done_e = wait_batch(oai, submit(oai, embeddings, "/v1/embeddings").id)
    assert (done_c.status, done_e.status) == ("completed", "completed")
    for line in by_custom_id(results(oai, done_c)).values():
        assert line["response"]["body"]["object"] == "text_completion"
        assert line["response"]["body"]["choices"][0]["text"]
    lines = by_custom_id(results(oai, done_e))
    for i, text in enumerate(texts):
        got = lines[f"e{i}"]["response"]["body"]["data"][0]["embedding"]
        online = oai.embeddings.create(model="minilm", input=text).data[0].embedding
        assert len(got) == len(online) == 384
        assert max(abs(a - b) for a, b in zip(got, online)) < 1e-4  # the same model, the same vector


# -- bad lines ------------------------------------------------------------------------------------
BAD_BODIES = {
    "unknown-alias": {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
    "bad-type": {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
    "no-messages": {"model": "smollm2"},
    "too-many-tokens": {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
    "embed-alias": {"model": "minilm", "messages": [{"role": "user", "content": "hi"}]},
}


def test_bad_lines_and_unknown_aliases_become_error_lines_with_the_routes_answer(oai, http):
    lines = [chat_line("good")] + [{"custom_id": k, "method": "POST", "url": "/v1/chat/completions", "body": b}
                                   for k, b in BAD_BODIES.items()]
    lines.append(chat_line("streamed", stream=True))
    batch = wait_batch(oai, submit(oai, lines).id)
    assert batch.status == "completed"  # bad lines never fail the batch
    assert batch.request_counts.model_dump() == {"total": 7, "completed": 1, "failed": 6}
    got = by_custom_id(results(oai, batch))
    assert got["good"]["response"]["status_code"] == 200
    for custom_id, body in BAD_BODIES.items():
        online = http.post("/v1/chat/completions", json=body)  # what the route answers the same body
        assert got[custom_id]["response"]["status_code"] == online.status_code >= 400, custom_id
        assert got[custom_id]["response"]["body"] == online.json(), custom_id
    assert got["unknown-alias"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert got["bad-type"]["response"]["body"]["error"]["param"] == "temperature"
    streamed = got["streamed"]["response"]
    assert streamed["status_code"] == 400 and streamed["body"]["error"]["param"] == "stream"


@pytest.mark.parametrize("text, code, line", [
    ("\n".join(json.dumps(chat_line(c)) for c in ["a", "b", "a"]), "duplicate_custom_id", 3),
    (json.dumps({**chat_line("a"), "url": "/v1/completions"}), "mismatched_endpoint", 1),
    (json.dumps(chat_line("a")) + "\nnot json\n", "invalid_json", 2),
    (json.dumps({**chat_line("a"), "method": "GET"}), "invalid_value", 1),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": [1]}), "invalid_value", 1),
])
def test_a_file_that_is_not_a_batch_fails_validation_naming_the_line(oai, text, code, line):
    batch = wait_batch(oai, submit(oai, text).id)
    assert batch.status == "failed" and batch.failed_at
    assert batch.output_file_id is None and batch.request_counts.total == 0
    assert (batch.errors.data[0].code, batch.errors.data[0].line) == (code, line), batch.errors


@pytest.mark.parametrize("change, param", [
    ({"input_file_id": "file-nothere"}, "input_file_id"),
    ({"endpoint": "/v1/moderations"}, "endpoint"),
    ({"completion_window": "soon"}, "completion_window"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"output_expires_after": {"anchor": "created_at", "seconds": 3600}}, "output_expires_after"),
])
def test_a_bad_create_request_is_a_4xx_naming_the_field(oai, http, change, param):
    body = {"input_file_id": upload(oai, [chat_line("a")]), "endpoint": "/v1/chat/completions",
            "completion_window": "24h", **change}
    r = http.post("/v1/batches", json=body)
    assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text


def test_uploads_other_than_batch_files_are_refused_naming_the_field(http):
    r = http.post("/v1/files", files={"file": ("x.jsonl", b"{}")}, data={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    r = http.post("/v1/files", data={"purpose": "batch"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"


# -- files and lists ------------------------------------------------------------------------------
def test_files_and_batches_list_in_pages_and_files_can_be_deleted(oai):
    ids = [upload(oai, [chat_line(f"p{i}")]) for i in range(3)]
    first = oai.files.list(limit=2, purpose="batch")
    assert len(first.data) == 2 and first.has_more and first.data[0].id == ids[-1]  # newest first
    listed = [f.id for f in itertools.islice(oai.files.list(limit=2, purpose="batch"), 100)]  # the SDK pages on
    assert listed[:3] == ids[::-1] and len(listed) == len(set(listed))
    assert oai.files.content(ids[0]).text == json.dumps(chat_line("p0")) + "\n"
    assert oai.files.delete(ids[0]).deleted is True
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(ids[0])
    with pytest.raises(openai.NotFoundError):
        oai.files.content(ids[0])
    made = [submit(oai, [chat_line("x")]).id for _ in range(2)]
    page = oai.batches.list(limit=1)
    assert len(page.data) == 1 and page.has_more and page.data[0].id == made[-1]
    paged = [b.id for b in itertools.islice(oai.batches.list(limit=1), 1000)]
    assert paged[:2] == made[::-1] and len(paged) == len(set(paged))
    for batch_id in made:
        wait_batch(oai, batch_id)


# -- cancel and expiry ----------------------------------------------------------------------------
def slow_lines(n: int, tokens: int) -> list[dict]:
    return [chat_line(f"slow-{i}", text=f"Tell a long story number {i}.", max_tokens=tokens, ignore_eos=True)
            for i in range(n)]


def smollm2_in_use(http) -> int:
    return http.get("/v1/models/smollm2").json()["in_use"]


def test_cancel_stops_the_lines_in_flight(oai, http):
    batch = submit(oai, slow_lines(24, 200))
    wait_for(lambda: smollm2_in_use(http) > 0, "a line of the batch running")
    cancelling = oai.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = wait_batch(oai, batch.id, bound=BOUND)
    assert batch.status == "cancelled" and batch.cancelled_at
    assert smollm2_in_use(http) == 0  # the running lines were stopped before it said cancelled
    counts = batch.request_counts
    assert counts.total == 24 and counts.completed + counts.failed == 24 and counts.completed < 24
    lines = by_custom_id(results(oai, batch))
    assert len(lines) == 24
    cancelled = [line for line in lines.values() if line["error"]]
    assert cancelled and all(line["error"]["code"] == "batch_cancelled" and line["response"] is None
                             for line in cancelled)
    with pytest.raises(openai.ConflictError):
        oai.batches.cancel(batch.id)


def test_lines_left_when_the_completion_window_ends_get_batch_expired(oai, http):
    batch = submit(oai, slow_lines(32, 128), window="3s")
    assert batch.expires_at - batch.created_at == 3 and batch.completion_window == "3s"
    batch = wait_batch(oai, batch.id, bound=60)
    assert batch.status == "expired" and batch.expired_at >= batch.expires_at
    lines = by_custom_id(results(oai, batch))
    assert len(lines) == 32 == batch.request_counts.total
    expired = [line for line in lines.values() if line["error"]]
    assert expired and all(line["error"]["code"] == "batch_expired" for line in expired)
    assert batch.request_counts.failed == len(expired)
    wait_for(lambda: smollm2_in_use(http) == 0, "the expired batch's lines stopped")


# -- a server of its own: keys, bounds, SIGKILL and restart -------------------------------------
KEYS = ("key-a", "key-b")


class BatchServer:
    """A server with two inference keys and small upload bounds, on a store that outlives it."""

    def __init__(self, tmp_path):
        self.store = tmp_path / "batches.sqlite3"
        self.env = {"LLMSERVE_API_KEYS": ",".join(KEYS), "LLMSERVE_MODELS__MINILM__PRELOAD": "false",
                    "LLMSERVE_BATCHES__STORE_PATH": str(self.store), "LLMSERVE_BATCHES__MAX_FILES": "6",
                    "LLMSERVE_BATCHES__MAX_FILE_BYTES": "65536",
                    "LLMSERVE_BATCHES__SLOT_SHARE": "0.5"}  # 4 lines at once: some are running at the kill
        self.server = start_server(self.env, name="test-server-batches")

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.server.url}/v1", api_key=key, max_retries=0, timeout=120)

    def kill(self) -> None:
        """SIGKILL to every process group of the server: BentoML's worker (which runs the batch)
        leads a group of its own, apart from `bentoml serve`'s; no shutdown step runs."""
        procs = [psutil.Process(pid) for pid in self.server.pids()]
        for group in {os.getpgid(p.pid) for p in procs}:
            os.killpg(group, signal.SIGKILL)
        _, alive = psutil.wait_procs(procs, timeout=30)
        assert not alive, alive
        self.server.proc.wait(timeout=30)

    def restart(self) -> None:
        self.server = start_server(self.env, name="test-server-batches")


@pytest.fixture(scope="module")
def batch_server(tmp_path_factory):
    s = BatchServer(tmp_path_factory.mktemp("batches"))
    yield s
    s.server.stop()


def test_one_keys_files_and_batches_are_invisible_to_another(batch_server):
    a, b = batch_server.client("key-a"), batch_server.client("key-b")
    file_id = upload(a, [chat_line("mine")])
    batch = a.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (lambda: b.files.retrieve(file_id), lambda: b.files.content(file_id),
                 lambda: b.files.delete(file_id), lambda: b.batches.retrieve(batch.id),
                 lambda: b.batches.cancel(batch.id),
                 lambda: b.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                          completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert file_id not in [f.id for f in b.files.list()] and batch.id not in [x.id for x in b.batches.list()]
    assert file_id in [f.id for f in a.files.list()] and batch.id in [x.id for x in a.batches.list()]
    r = httpx.get(f"{batch_server.server.url}/v1/files", timeout=30)
    assert r.status_code == 401
    done = wait_batch(a, batch.id)
    assert done.status == "completed"
    assert len(results(a, done)) == 1
    with pytest.raises(openai.NotFoundError):
        b.files.content(done.output_file_id)


def test_uploads_past_the_byte_and_count_bounds_get_a_4xx_naming_them(batch_server):
    a = batch_server.client("key-a")
    with pytest.raises(openai.APIStatusError) as big:
        a.files.create(file=("big.jsonl", b"x" * 65537), purpose="batch")
    assert big.value.status_code == 413 and big.value.body["param"] == "file"
    assert "batches.max_file_bytes" in big.value.body["message"]
    made = []
    try:
        with pytest.raises(openai.BadRequestError) as many:
            for _ in range(7):  # max_files is 6, whatever the other tests left
                made.append(upload(a, [chat_line("x")]))
        assert many.value.body["param"] == "file" and "batches.max_files" in many.value.body["message"]
    finally:
        for file_id in made:
            a.files.delete(file_id)
    upload(a, [chat_line("room again")])  # deleting made room


def test_a_batch_resumes_after_a_sigkill_and_runs_no_finished_line_twice(batch_server):
    a = batch_server.client("key-a")
    n = 16
    batch = submit(a, slow_lines(n, 24))
    wait_for(lambda: a.batches.retrieve(batch.id).request_counts.completed >= 3, "three lines done", RUN_BOUND,
             every=0.2)
    batch_server.kill()
    with sqlite3.connect(batch_server.store) as db:  # what the killed server had committed
        before = {cid: json.loads(result) for cid, result in db.execute(
            "SELECT custom_id, result FROM lines WHERE batch_id = ? AND state = 'done'", (batch.id,))}
        running = db.execute("SELECT COUNT(*) FROM lines WHERE batch_id = ? AND state = 'running'",
                             (batch.id,)).fetchone()[0]
    assert 3 <= len(before) < n, f"{len(before)} of {n} lines done at the kill: too fast to show a resume"
    assert running > 0  # lines were cut off mid-generation
    batch_server.restart()
    a = batch_server.client("key-a")
    done = wait_batch(a, batch.id, bound=RUN_BOUND * 2)
    assert done.status == "completed"
    assert done.request_counts.model_dump() == {"total": n, "completed": n, "failed": 0}
    lines = by_custom_id(results(a, done))
    assert set(lines) == {f"slow-{i}" for i in range(n)}  # each custom_id exactly once
    for custom_id, line in before.items():  # finished before the kill: kept, not run again
        assert lines[custom_id] == line
    assert all(line["response"]["status_code"] == 200 for line in lines.values())
