"""The OpenAI-compatible HTTP surface (FastAPI), mounted into the BentoML service.

Routes, under /v1 and again under /api/v1:
  POST /chat/completions, POST /completions, POST /embeddings, GET /models,
  POST /responses, GET /responses/{id}, DELETE /responses/{id} (llmserve/responses.py)
Model admin, at the root and under both prefixes:
  GET /models, GET /models/{name}, POST /models/{name}/load, POST /models/{name}/unload

Every error is OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any, Awaitable, Callable

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from backends import errors as engine_errors

from .errors import (APIError, Forbidden, InvalidRequest, Unauthorized, internal_error, to_api_error,
                     validation_error_to_api_error)
from .manager import MAY_LOAD
from .openai_api import OpenAIOperations
from .responses import ResponsesOperations
from .responses_schemas import ResponsesRequest
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .ui import mount as mount_pages

log = logging.getLogger("llmserve")

app = FastAPI(title="llmserve OpenAI-compatible API", docs_url=None, openapi_url="/v1/openapi.json")
mount_pages(app)  # the index page at /, the console at /ui, /v1/docs with local Swagger UI assets


def ops(request: Request) -> OpenAIOperations:
    """The operations object the service put on the app at start-up."""
    return request.app.state.ops


def responses_ops(request: Request) -> ResponsesOperations:
    return request.app.state.responses


def error_response(exc: APIError) -> JSONResponse:
    """The OpenAI-shaped answer of an APIError, headers (Retry-After) included."""
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _matches(key: bytes, keys: list[bytes]) -> bool:
    # compared in constant time, against every key (no early exit that a timing could reveal)
    return bool(key) and sum(hmac.compare_digest(key, k) for k in keys) > 0


def authorize(settings, authorization: str, admin: bool) -> None:
    """Keys, when set: inference routes and the model list take an inference or admin key;
    load / unload take an admin key when any is set (else what the inference routes take)."""
    scheme, _, key = authorization.partition(" ")
    key = key.strip().encode() if scheme.lower() == "bearer" else b""
    inference, admins = settings.inference_keys(), settings.admin_key_list()
    if admin and admins:
        if _matches(key, admins):
            return
        if _matches(key, inference):
            raise Forbidden("This key may use the inference routes only; loading and unloading models needs an "
                            "admin key (LLMSERVE_ADMIN_KEYS).", code="insufficient_permissions")
        raise Unauthorized("Missing or wrong admin key: send `Authorization: Bearer <admin key>`.",
                           code="invalid_api_key")
    if inference and not _matches(key, inference + admins):
        raise Unauthorized("Missing or wrong API key: send `Authorization: Bearer <key>`.", code="invalid_api_key")


def may_load(settings, authorization: str) -> bool:
    """Whether this caller could load a model by hand (POST /models/{name}/load), which
    limits.load_on_demand_requires_admin asks of a request that loads one on demand."""
    try:
        authorize(settings, authorization, admin=True)
    except APIError:
        return False
    return True


def check_keys(settings, authorization: str, admin: bool) -> None:
    """authorize(), and what the caller may load on demand, for the rest of the request."""
    authorize(settings, authorization, admin)
    MAY_LOAD.set(admin or may_load(settings, authorization))


async def check_api_key(request: Request) -> None:
    # async: a plain function would run in a worker thread, and MAY_LOAD would not reach the route
    check_keys(request.app.state.ops.settings, request.headers.get("authorization", ""), admin=False)


def check_admin_key(request: Request) -> None:
    authorize(request.app.state.ops.settings, request.headers.get("authorization", ""), admin=True)


async def no_body(request: Request) -> None:
    """The admin actions take no options: a body is refused, naming what it held, rather
    than silently ignored."""
    raw = await request.body()
    if not raw.strip():
        return
    try:
        body = json.loads(raw)
    except ValueError:
        raise InvalidRequest("The request body is not valid JSON; this route takes no body.", code="invalid_json")
    if body in ({}, None):
        return
    fields = ", ".join(map(str, body)) if isinstance(body, dict) else type(body).__name__
    raise InvalidRequest(
        f"{request.method} {request.url.path} takes no body, got: {fields}. Engine and arguments come from the "
        "alias in configuration.yaml.", param=next(iter(body), None) if isinstance(body, dict) else None,
        code="unexpected_body")


class BodyLimit:
    """A 413 for request bodies over limits.max_body_bytes, declared or streamed (pure ASGI)."""

    def __init__(self, app, limit: Callable[[], int]):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit()
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(send, limit)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._too_large(send, limit)

    @staticmethod
    async def _too_large(send, limit: int) -> None:
        err = APIError(f"The request body is larger than this server's limit of {limit} bytes "
                       "(limits.max_body_bytes).", status=413, code="request_too_large")
        await error_response(err)({"type": "http"}, None, send)


class _TooLarge(BaseException):
    """BaseException: FastAPI turns any Exception raised while it reads a body into a 400."""


class ByteOrderMark:
    """Drops a UTF-8 byte order mark that starts a request body (pure ASGI): the /v1 routes
    read such JSON (Python's json does), BentoML's native APIs would answer a 400 of their
    own shape, so both read it alike."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        first = True

        async def without_mark():
            nonlocal first
            message = await receive()
            if first and message["type"] == "http.request":
                first = False
                body = message.get("body", b"")
                if body.startswith(b"\xef\xbb\xbf"):
                    message = {**message, "body": body[3:]}
            return message

        await self.app(scope, without_mark, send)


class NativeAPIKeys:
    """The same keys for BentoML's native APIs (POST /chat, /load_model, ...), which do not
    pass through this app's routes (pure ASGI, in front of the BentoML service)."""

    ADMIN = {"/load_model", "/unload_model"}
    INFERENCE = {"/chat", "/complete", "/embed", "/respond", "/list_models"}

    def __init__(self, app, settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and (path in self.ADMIN or path in self.INFERENCE):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
            try:
                check_keys(self.settings, headers.get("authorization", ""), admin=path in self.ADMIN)
            except APIError as exc:
                return await error_response(exc)(scope, receive, send)
        await self.app(scope, receive, send)


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


openai_router = APIRouter(dependencies=[Depends(check_api_key)])
admin_router = APIRouter(dependencies=[Depends(check_api_key)])  # reads: the model list
admin_actions = [Depends(check_admin_key), Depends(no_body)]


@openai_router.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, o: OpenAIOperations = Depends(ops)):
    return respond(await while_connected(request, o.chat(req)))


@openai_router.post("/completions")
async def completions(req: CompletionRequest, request: Request, o: OpenAIOperations = Depends(ops)):
    return respond(await while_connected(request, o.complete(req)))


@openai_router.post("/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request, o: OpenAIOperations = Depends(ops)):
    return await while_connected(request, o.embed(req))


@openai_router.post("/responses")
async def create_response(req: ResponsesRequest, request: Request, r: ResponsesOperations = Depends(responses_ops)):
    return respond(await while_connected(request, r.create(req)))


@openai_router.get("/responses/{response_id}")
async def retrieve_response(response_id: str, r: ResponsesOperations = Depends(responses_ops)):
    return await r.retrieve(response_id)


@openai_router.delete("/responses/{response_id}")
async def delete_response(response_id: str, r: ResponsesOperations = Depends(responses_ops)):
    return await r.delete(response_id)


@admin_router.get("/models")
async def list_models(o: OpenAIOperations = Depends(ops)):
    return o.list_models()


@admin_router.get("/models/{name}")
async def get_model(name: str, o: OpenAIOperations = Depends(ops)):
    o.manager.config(name)  # 404 for an unknown alias
    return next(m for m in o.list_models()["data"] if m["id"] == name)


@admin_router.post("/models/{name}/load", dependencies=admin_actions)
async def load_model(name: str, o: OpenAIOperations = Depends(ops)):
    return await o.load_model(name)


@admin_router.post("/models/{name}/unload", dependencies=admin_actions)
async def unload_model(name: str, o: OpenAIOperations = Depends(ops)):
    return await o.unload_model(name)


@openai_router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
async def unknown_route(path: str, request: Request):
    # BentoML answers unmatched paths with a plain-text 404; under the API prefixes
    # clients get an OpenAI-shaped one instead
    raise APIError(f"Unknown route: {request.method} {request.url.path}", status=404, code="not_found")


for prefix in ("/v1", "/api/v1"):
    app.include_router(admin_router, prefix=prefix)
    app.include_router(openai_router, prefix=prefix)  # after admin: it ends with the catch-all
app.include_router(admin_router)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    if exc.status >= 500:
        log.error("%s %s -> %s: %s", request.method, request.url.path, exc.status, exc.message)
    return error_response(exc)


@app.exception_handler(engine_errors.EngineError)
async def _engine_error(request: Request, exc: engine_errors.EngineError):
    return await _api_error(request, to_api_error(exc))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    err = validation_error_to_api_error(list(exc.errors()))
    return error_response(err)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = "not_found" if exc.status_code == 404 else None
    err = APIError(f"{exc.detail}: {request.method} {request.url.path}", status=exc.status_code, code=kind)
    return error_response(err)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    log.error("unexpected error on %s %s", request.method, request.url.path)
    return error_response(internal_error(exc))


class ControlCharacterPaths:
    """An OpenAI-shaped 404 for paths with control characters (a decoded %0A): no route
    takes them, and Starlette's mount pattern skips them, so the platform would answer with
    a plain-text 404 (found by schemathesis)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and any(ord(c) < 32 for c in path):
            err = APIError(f"Unknown route: {scope.get('method')} {path!r}", status=404, code="not_found")
            return await error_response(err)(scope, receive, send)
        await self.app(scope, receive, send)
