"""Locust users for OpenAI-compatible servers: streaming chat, and embeddings.

Besides locust's own request stats, every streamed chat records time to first token,
mean inter-token latency and output tokens (from the final usage chunk) as one JSON line
in ``--records-dir`` (one file per locust process), which benchmarks/run.py aggregates.
TTFT is also reported to locust as its own request type, so it shows in the HTML report.

    locust -f benchmarks/locustfile.py --headless -H http://127.0.0.1:3000 -u 8 -r 8 -t 30s \
        --model smollm2 --output-tokens 64 --prompt-words 32
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from locust import HttpUser, events, task

from prompts import prompt_text  # benchmarks/prompts.py: locust puts this folder on sys.path

@events.init_command_line_parser.add_listener
def _options(parser):
    g = parser.add_argument_group("llmserve")
    g.add_argument("--model", default="smollm2", help="model name sent in each request")
    g.add_argument("--api-prefix", default="/v1", help="path before /chat/completions")
    g.add_argument("--prompt-words", type=int, default=32, help="prompt length in words (~1.3 tokens each)")
    g.add_argument("--output-tokens", type=int, default=64, help="max_tokens of every request")
    g.add_argument("--ignore-eos", default="true", help="send ignore_eos (engines that know it run to max_tokens)")
    g.add_argument("--records-dir", default="", help="folder for per-request JSON lines")
    g.add_argument("--embed-inputs", type=int, default=8, help="inputs per embeddings request")


class _Records:
    """One JSON-lines file per locust process."""

    _file = None

    @classmethod
    def write(cls, env, record: dict) -> None:
        folder = env.parsed_options.records_dir
        if not folder:
            return
        if cls._file is None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            cls._file = open(Path(folder) / f"records-{os.getpid()}.jsonl", "a", buffering=1)
        cls._file.write(json.dumps(record) + "\n")


class ChatUser(HttpUser):
    """Streams chat completions of a fixed output length, one after another."""


    def on_start(self):
        self.n = 0

    @task
    def stream_chat(self):
        opts = self.environment.parsed_options
        self.n += 1
        body = {
            "model": opts.model,
            "messages": [{"role": "user", "content": prompt_text(opts.prompt_words, self.n)}],
            "max_tokens": opts.output_tokens,
            "temperature": 0.8,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if opts.ignore_eos.lower() == "true":
            body["ignore_eos"] = True
        start = time.perf_counter()
        first = last = None
        chunks, tokens, error = 0, None, None
        # requests' iter_content(None) hands over each chunk as it arrives (geventhttpclient's
        # FastHttpUser buffered whole streams here, hiding the inter-token gaps)
        with self.client.post(f"{opts.api_prefix}/chat/completions", json=body, stream=True, timeout=600,
                              catch_response=True, name="chat (stream)") as resp:
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {resp.text[:200]}"
            else:
                buffer = b""
                for raw in resp.iter_content(chunk_size=None):
                    buffer += raw.encode() if isinstance(raw, str) else raw
                    while b"\n\n" in buffer:
                        event, buffer = buffer.split(b"\n\n", 1)
                        data = event.decode("utf-8", "replace").removeprefix("data: ").strip()
                        if not data or data == "[DONE]":
                            continue
                        msg = json.loads(data)
                        if "error" in msg:
                            error = msg["error"].get("message", "error event")
                            continue
                        if msg.get("usage"):
                            tokens = msg["usage"]["completion_tokens"]
                        if any((c.get("delta") or {}).get("content") for c in msg.get("choices", [])):
                            now = time.perf_counter()
                            first = first or now
                            last = now
                            chunks += 1
            if tokens is None:  # a server that sends no usage chunk: one token per chunk
                tokens = chunks
            if error is None and first is None:
                error = "stream ended without tokens"
            if error:
                resp.failure(error)
            else:
                resp.success()
        end = time.perf_counter()
        if error is None:
            ttft = first - start
            itl = (last - first) / (tokens - 1) if tokens > 1 else 0.0
            events.request.fire(request_type="TTFT", name="time to first token", response_time=ttft * 1000,
                                response_length=0, exception=None, context={})
            _Records.write(self.environment, {"start": time.time() - (end - start), "latency": end - start,
                                              "ttft": ttft, "itl": itl, "tokens": tokens, "chunks": chunks})
        else:
            _Records.write(self.environment, {"start": time.time(), "error": error})


class EmbeddingUser(HttpUser):
    """Second task set: embeddings requests. Name the user class on the command line
    (`ChatUser` or `EmbeddingUser`) to run one of the two alone."""


    @task
    def embed(self):
        opts = self.environment.parsed_options
        inputs = [prompt_text(opts.prompt_words, i) for i in range(opts.embed_inputs)]
        with self.client.post(f"{opts.api_prefix}/embeddings", json={"model": opts.model, "input": inputs},
                              timeout=600, catch_response=True, name="embeddings") as resp:
            if resp.status_code != 200 or len(resp.json().get("data", [])) != len(inputs):
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
