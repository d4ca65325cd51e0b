"""What the operator sees: the server's own lines on the console of `bentoml serve`, and the
state of every alias in GET /models while a load happens."""

from __future__ import annotations

import re
import threading
import time

import httpx

MIB = 1 << 20


def console(server) -> str:
    return server.log_path.read_text(errors="replace")


def model_row(http, alias: str) -> dict:
    return http.get(f"/models/{alias}").json()


def test_start_lists_every_alias_and_where_to_call(server):
    log = console(server)
    for alias, engine, when in (("smollm2", "llamacpp", "loads at start"), ("minilm", "transformers", "loads at start"),
                                ("smollm2-hf", "transformers", "loads on its first request"),
                                ("llama3-70b", "vllm", "loads on its first request")):
        assert re.search(rf"\[INFO\] .*model {re.escape(alias)}: {engine} engine, \w+, {when}", log), alias
    assert f"OpenAI API at {server.url}/v1" in log
    assert f"docs at {server.url}/v1/docs" in log and f"metrics at {server.url}/metrics" in log
    assert f"web console at {server.url}/ui" in log
    # each preloaded model: how long it took and what memory it took, in BentoML's format
    loaded = re.search(r"\[INFO\] .*loaded smollm2 \(llamacpp\) in ([\d.]+) s, memory \+(\d+) MiB RSS", log)
    assert loaded and 0 < float(loaded.group(1)) < 120 and int(loaded.group(2)) > 50


def test_an_on_demand_load_shows_in_models_the_log_and_the_metric(server, http):
    alias = "smollm2-hf"  # under a second to load once its GGUF was dequantized (cached): polled closely
    http.post(f"/models/{alias}/load", timeout=300)  # (already loaded when the whole suite runs)
    assert http.post(f"/models/{alias}/unload").json()["was_loaded"]
    answer: dict = {}

    def request():
        body = {"model": alias, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        answer["r"] = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)

    thread = threading.Thread(target=request)
    sent = time.time()
    thread.start()
    seen = None
    while thread.is_alive() and seen is None:
        row = model_row(http, alias)
        if row["loading"]:
            seen = row
        time.sleep(0.01)
    thread.join(timeout=300)
    assert answer["r"].status_code == 200
    assert seen is not None, "GET /models never showed the alias loading"
    assert sent - 1 <= seen["loading_since"] <= time.time() and seen["waiting_for_load"] == 1 and not seen["loaded"]

    row = model_row(http, alias)
    assert row["loaded"] and not row["loading"] and row["loading_since"] is None
    assert seen["loading_since"] <= row["loaded_at"] <= row["last_used"] <= time.time()
    assert row["memory"]["rss_bytes"] > 200 * MIB  # float32 weights of a 135M-parameter model
    assert row["running_requests"] == 0 and row["queued_requests"] == 0

    log = console(server)
    assert f"loading {alias} (transformers) ..." in log
    line = re.search(rf"loaded {alias} \(transformers\) in ([\d.]+) s, memory \+(\d+) MiB RSS, GPU \+n/a; "
                     r"1 request\(s\) waited for it", log)
    assert line and float(line.group(1)) > 0
    assert f"unloaded {alias} (requested)" in log
    assert server.metric("llm_model_load_seconds_count", model=alias) >= 1
    assert server.metric("llm_model_load_seconds_sum", model=alias) > 0


def test_a_failed_load_shows_its_reason_in_models_and_in_one_log_line(server, http):
    # llama3-8b names a Hugging Face model that is not on disk, and the hub is offline
    r = http.post("/models/llama3-8b/load", timeout=300)
    assert r.status_code >= 400
    row = model_row(http, "llama3-8b")
    assert not row["loaded"] and row["error"]
    assert "LocalEntryNotFoundError" in row["error"]  # the hub is offline and the weights are not on disk
    line = re.search(r"\[ERROR\] .*loading llama3-8b failed: LocalEntryNotFoundError.*\n(.*)", console(server))
    assert line and not line.group(1).startswith("Traceback")  # one line, no stack trace
