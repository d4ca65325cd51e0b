"""The soak mix (benchmarks/soak.py): streaming and non-streaming chat, completions,
embeddings and admin reads, each answer checked, not only its status."""

from __future__ import annotations

import json

from locust import HttpUser, task

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 24}


class SoakUser(HttpUser):
    @task(4)
    def stream_chat(self):
        with self.client.post("/v1/chat/completions", json={**CHAT, "stream": True}, stream=True,
                              catch_response=True, name="chat stream") as r:
            lines = [line for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
            if r.status_code != 200 or not lines or lines[-1] != "data: [DONE]" or '"error"' in "".join(lines):
                r.failure(f"{r.status_code}: {lines[-1:] or r.text[:200]}")

    @task(3)
    def chat(self):
        with self.client.post("/v1/chat/completions", json=CHAT, catch_response=True, name="chat") as r:
            if r.status_code != 200 or not r.json()["choices"][0]["message"]["content"]:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(2)
    def complete(self):
        body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 16}
        with self.client.post("/v1/completions", json=body, catch_response=True, name="completion") as r:
            if r.status_code != 200 or r.json()["usage"]["completion_tokens"] < 1:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(2)
    def embed(self):
        body = {"model": "minilm", "input": ["a cat on a mat", "the stock market"]}
        with self.client.post("/v1/embeddings", json=body, catch_response=True, name="embeddings") as r:
            if r.status_code != 200 or len(r.json()["data"]) != 2:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(1)
    def admin_reads(self):
        with self.client.get("/models", catch_response=True, name="models") as r:
            if r.status_code != 200 or not json.loads(r.text)["data"]:
                r.failure(f"{r.status_code}: {r.text[:200]}")
