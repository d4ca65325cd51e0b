"""A bare FastAPI/uvicorn server that streams OpenAI-shaped chat chunks, for two measurements:

- calibrating the load generator (benchmarks/run.py --calibrate): ``--rate`` tokens/s per
  request; if locust measures close to concurrency x rate, it is not the bottleneck;
- the front-end baseline (benchmarks/frontend.py): ``--rate 0`` streams as fast as it can,
  the same chunks as the service streams from its stub engine, with nothing in between.

    python benchmarks/stub_server.py --port 3999 --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

RATE = 200.0
app = FastAPI()


@app.post("/v1/chat/completions")
async def chat(request: Request):
    body = await request.json()
    n = int(body.get("max_tokens") or 16)

    async def events():
        start = time.perf_counter()
        base = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model", "stub")}
        yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None, 'logprobs': None}]})}\n\n"
        for i in range(n):
            if RATE > 0:  # pace against the start, so the rate holds however long each write takes
                await asyncio.sleep(max(0.0, start + (i + 1) / RATE - time.perf_counter()))
            else:
                await asyncio.sleep(0)
            finish = "length" if i == n - 1 else None
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": finish,
                                          "logprobs": None}]}
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": n + 8}
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@app.get("/health")
async def health():
    return {"ok": True}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=3999)
    p.add_argument("--rate", type=float, default=200.0, help="tokens/s streamed to each request; 0: as fast as it can")
    a = p.parse_args()
    RATE = a.rate
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")
