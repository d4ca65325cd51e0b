"""The OpenAI-compatible HTTP surface (FastAPI), mounted into the BentoML service.

Routes, under /v1 and again under /api/v1:
  POST /chat/completions, POST /completions, POST /embeddings, GET /models
Model admin, at the root and under both prefixes:
  GET /models, GET /models/{name}, POST /models/{name}/load, POST /models/{name}/unload

Every error is OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import APIError, Unauthorized, validation_error_to_api_error
from .openai_api import OpenAIOperations
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

log = logging.getLogger("llmserve")

app = FastAPI(title="llmserve OpenAI-compatible API", docs_url="/v1/docs", openapi_url="/v1/openapi.json")


def ops(request: Request) -> OpenAIOperations:
    """The operations object the service put on the app at start-up."""
    return request.app.state.ops


def check_api_key(request: Request) -> None:
    key = request.app.state.ops.settings.api_key
    if key and request.headers.get("authorization", "") != f"Bearer {key}":
        raise Unauthorized("Missing or wrong API key: send `Authorization: Bearer <key>`.", code="invalid_api_key")


def respond(result) -> Any:
    """One JSON body, or the operations' Server-Sent Events as a streaming response."""
    if isinstance(result, dict):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


openai_router = APIRouter(dependencies=[Depends(check_api_key)])
admin_router = APIRouter(dependencies=[Depends(check_api_key)])


@openai_router.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, o: OpenAIOperations = Depends(ops)):
    return respond(await o.chat(req))


@openai_router.post("/completions")
async def completions(req: CompletionRequest, o: OpenAIOperations = Depends(ops)):
    return respond(await o.complete(req))


@openai_router.post("/embeddings")
async def embeddings(req: EmbeddingRequest, o: OpenAIOperations = Depends(ops)):
    return await o.embed(req)


@admin_router.get("/models")
async def list_models(o: OpenAIOperations = Depends(ops)):
    return o.list_models()


@admin_router.get("/models/{name}")
async def get_model(name: str, o: OpenAIOperations = Depends(ops)):
    o.manager.config(name)  # 404 for an unknown alias
    return next(m for m in o.list_models()["data"] if m["id"] == name)


@admin_router.post("/models/{name}/load")
async def load_model(name: str, o: OpenAIOperations = Depends(ops)):
    return await o.load_model(name)


@admin_router.post("/models/{name}/unload")
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
    return JSONResponse(exc.body(), status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    err = validation_error_to_api_error(list(exc.errors()))
    return JSONResponse(err.body(), status_code=err.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = "not_found" if exc.status_code == 404 else None
    err = APIError(f"{exc.detail}: {request.method} {request.url.path}", status=exc.status_code, code=kind)
    return JSONResponse(err.body(), status_code=exc.status_code)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    body = {"error": {"message": f"Internal error: {type(exc).__name__}: {exc}", "type": "server_error",
                      "param": None, "code": None}}
    return JSONResponse(body, status_code=500)
