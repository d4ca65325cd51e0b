"""One streamed chat request against any OpenAI-style server, timed: what the small benchmark
scripts (prefix_cache.py, speculative.py) measure each request with."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import httpx


async def chat(client: httpx.AsyncClient, alias: str, system: str, question: str, tokens: int) -> dict:
    body = {"model": alias, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    start, ttft, usage = time.perf_counter(), None, {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:  # an error event after the first byte
                raise RuntimeError(f"{alias}: {chunk['error']}")
            if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    return {"ttft": ttft if ttft is not None else time.perf_counter() - start,
            "prompt": usage.get("prompt_tokens", 0),
            "completion": usage.get("completion_tokens", 0), "wall": time.perf_counter() - start,
            "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


@contextlib.contextmanager
def serving(url: Optional[str], env: Optional[dict[str, str]] = None) -> Iterator[str]:
    """``url``, or that of a server started here with the shipped configuration (stopped after)."""
    if url is not None:
        yield url
        return
    from llmserve.launcher import bentoml_serve

    server = bentoml_serve(Path(tempfile.mkdtemp(prefix="bench-")) / "server.log", env)
    try:
        server.wait_ready(300)
        yield server.url
    finally:
        server.stop()


def write(rows: list[dict], header: str, line, out: Optional[Path]) -> None:
    """Prints the rows as a Markdown table (``line(row)`` makes each) and saves them as JSON."""
    print("\n" + header)
    for r in rows:
        print(line(r))
    if out:
        out.write_text(json.dumps(rows, indent=1))
