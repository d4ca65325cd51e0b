"""Model admin over plain HTTP: list, load, unload at run time; unloading frees memory."""

from __future__ import annotations

from conftest import wait_for

MIB = 1 << 20


def row(http, alias, prefix=""):
    models = http.get(f"{prefix}/models").json()["data"]
    return next(m for m in models if m["id"] == alias)


def test_list_shows_every_alias_with_backend_and_state(http):
    for prefix in ("", "/v1", "/api/v1"):
        models = {m["id"]: m for m in http.get(f"{prefix}/models").json()["data"]}
        assert set(models) >= {"smollm2", "smollm2-hf", "smollm2-embed", "minilm", "llama3-8b", "llama3-70b"}
        assert models["smollm2"]["backend"] == "llamacpp" and models["smollm2"]["loaded"] is True
        assert models["minilm"]["loaded"] is True  # preloaded
        assert models["llama3-8b"]["loaded"] is False
    assert http.get("/v1/models/smollm2").json()["context_length"] == 2048


def test_unload_frees_memory_and_reload_serves(server, http):
    alias = "smollm2-hf"  # ~540 MB of float32 weights
    r = http.post(f"/v1/models/{alias}/load")
    assert r.status_code == 200 and r.json()["loaded"] is True and r.json()["backend"] == "transformers"
    assert row(http, alias)["loaded"] is True
    loaded = server.rss_bytes()

    r = http.post(f"/models/{alias}/unload")
    assert r.status_code == 200 and r.json() == {"id": alias, "loaded": False, "was_loaded": True}
    wait_for(lambda: loaded - server.rss_bytes() > 400 * MIB, f"unloading {alias} did not give back 400 MiB of its "
             "~540 MiB of weights")
    assert row(http, alias)["loaded"] is False
    assert http.post(f"/models/{alias}/unload").json()["was_loaded"] is False

    # a request for the unloaded alias loads it on demand (load_on_demand: true)
    r = http.post("/v1/completions", json={"model": alias, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert row(http, alias)["loaded"] is True


def test_load_is_idempotent(http):
    a = http.post("/models/smollm2/load").json()
    b = http.post("/api/v1/models/smollm2/load").json()
    assert a == b and a["loaded"] is True
