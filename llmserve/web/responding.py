"""How an operation's answer becomes an HTTP response: one JSON body, an OpenAI-shaped error,
or Server-Sent Events that end when their client leaves; and the work an answer waits on,
cancelled when its client goes away before it is ready."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable

import anyio
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import APIError, internal_error, to_api_error, validation_error_to_api_error

log = logging.getLogger("llmserve")


def api_error_of(request: Request, exc: BaseException) -> APIError:
    """What the client is told of anything a route raised: its APIError, an engine's error mapped,
    a body that failed validation (400 naming the field) or could not be read at all (FastAPI's
    HTTPException: bad UTF-8, nesting too deep), and a 500 with an error id for the rest. Every
    API family renders this one error in its own shape."""
    if isinstance(exc, RequestValidationError):
        return validation_error_to_api_error(list(exc.errors()))
    if isinstance(exc, StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else None
        return APIError(f"{exc.detail}: {request.method} {request.url.path}", status=exc.status_code, code=kind)
    err = to_api_error(exc)
    if err is None:
        log.error("unexpected error on %s %s", request.method, request.url.path)
        return internal_error(exc)
    if err.status >= 500:
        log.error("%s %s -> %s: %s", request.method, request.url.path, err.status, err.message)
    return err


def error_response(exc: APIError) -> JSONResponse:
    """The OpenAI-shaped answer of an APIError, headers (Retry-After) included."""
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def respond(result) -> Any:
    """One JSON body (or while_connected's 499), or the operations' Server-Sent Events as a
    streaming response."""
    if isinstance(result, (dict, Response)):
        return result
    return EventStreamResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class EventStreamResponse(StreamingResponse):
    """A stream that ends when its client leaves, and closes its events however it ends.

    Starlette (ASGI 2.4) notices a client gone only when a chunk fails to send, and a stream
    may send nothing for long (a prompt's prefill, a tool call held back until complete), so
    the receive channel is watched throughout. Closing the events releases what they hold
    (the model's in-use count, gauges, engine work), also when none was asked for yet."""

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client is gone
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


async def while_connected(request: Request, work: Awaitable[Any]) -> Any:
    """Awaits an operation while watching its client: one that leaves before the answer is
    ready cancels the work, which stops the engine's generation (the answer would be lost)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if watcher.done() and watcher.exception() is not None:  # cannot watch: just wait
            await asyncio.wait({task})
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its engine work is stopped before the handler returns
    if task.cancelled():
        log.info("%s %s: the client left; its generation was stopped", request.method, request.url.path)
        return Response(status_code=499)  # no one reads it
    return task.result()


async def _disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already, so the
    ASGI receive channel has nothing else to say)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
