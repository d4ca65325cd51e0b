"""A tiny OpenAI-style server that streams tokens at a known rate, for calibrating the load
generator (benchmarks/run.py --calibrate): if locust measures close to concurrency x rate,
it is not the bottleneck at that load.

    python benchmarks/stub_server.py --port 3999 --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

RATE = 200.0


async def chat(request: Request):
    body = await request.json()
    n = int(body.get("max_tokens") or 16)

    async def events():
        start = time.perf_counter()
        base = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "model": body.get("model", "stub")}
        for i in range(n):
            # pace against the start, so the rate holds however long each write takes
            await asyncio.sleep(max(0.0, start + (i + 1) / RATE - time.perf_counter()))
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': {'prompt_tokens': 1, 'completion_tokens': n, 'total_tokens': n + 1}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def health(request: Request):
    return JSONResponse({"ok": True})


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=3999)
    p.add_argument("--rate", type=float, default=200.0, help="tokens/s streamed to each request")
    a = p.parse_args()
    RATE = a.rate
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")
