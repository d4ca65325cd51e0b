"""A stub engine for measuring the front end (benchmarks/frontend.py), not a shipped backend.

It streams one token per step as fast as the event loop lets it, so everything measured
is the service's own cost per chunk: routes, OpenAI operations, SSE encoding, BentoML's
middleware and uvicorn. Configured as ``backend: benchmarks.stub_engine:StubBackend``.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from backends.base import CHAT, COMPLETION, Backend, Delta, SamplingParams


class StubBackend(Backend):
    name = "stub"

    async def load(self) -> None:
        self._running = 0

    async def unload(self) -> None:
        pass

    def capabilities(self) -> set[str]:
        return {CHAT, COMPLETION}

    def context_length(self) -> int:
        return 1_000_000

    def running_requests(self) -> int:
        return self._running

    async def encode_chat(self, messages) -> list[int]:
        return [1] * 8

    async def encode_text(self, text) -> list[int]:
        return [1] * 8

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        self._running += 1
        try:
            for i in range(1, params.max_tokens + 1):
                await asyncio.sleep(0)  # one token per turn of the event loop, like a real engine's stream
                yield Delta(" tok", i, "length" if i == params.max_tokens else None)
        finally:
            self._running -= 1
