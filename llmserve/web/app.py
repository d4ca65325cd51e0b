"""The OpenAI-compatible HTTP app (FastAPI), mounted into the BentoML service.

Routes, under /v1 and again under /api/v1:
  POST /chat/completions, POST /completions, POST /embeddings, GET /models,
  POST /responses, GET /responses/{id}, DELETE /responses/{id}, GET /responses/{id}/input_items
  the Files and Batch APIs: /files, /batches (batches.py)
Model admin, at the root and under both prefixes:
  GET /models, GET /models/{name}, POST /models/{name}/load, POST /models/{name}/unload

The operations behind them live in llmserve/serving/; keys in auth.py; how answers are sent
in responding.py. Every error is OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
from typing import Literal, Optional

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from backends import errors as engine_errors

from ..errors import APIError, InvalidRequest
from ..responses_schemas import ResponsesRequest
from ..schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from ..serving import OpenAIOperations
from ..serving.responses import ResponsesOperations
from ..ui import mount as mount_pages
from . import anthropic, batches, retrieval
from .auth import check_admin_key, check_api_key
from .responding import api_error_of, error_response, respond, while_connected

app = FastAPI(title="llmserve OpenAI-compatible API", docs_url=None, openapi_url="/v1/openapi.json")
mount_pages(app)  # the index page at /, the console at /ui, /v1/docs with local Swagger UI assets


def ops(request: Request) -> OpenAIOperations:
    """The operations object the service put on the app at start-up."""
    return request.app.state.ops


def responses_ops(request: Request) -> ResponsesOperations:
    return request.app.state.responses


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


@openai_router.get("/responses/{response_id}/input_items")
async def list_input_items(response_id: str, limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "desc", after: Optional[str] = None,
                           r: ResponsesOperations = Depends(responses_ops)):
    return await r.input_items(response_id, limit, order, after)


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
    app.include_router(anthropic.router, prefix=prefix)  # its own error shape and keys (x-api-key)
    app.include_router(retrieval.router, prefix=prefix)
    app.include_router(batches.router, prefix=prefix)
    app.include_router(openai_router, prefix=prefix)  # after admin: it ends with the catch-all
app.include_router(admin_router)


# every error of the OpenAI routes, mapped once (responding.api_error_of) and written in OpenAI's shape
async def _error(request: Request, exc: Exception):
    return error_response(api_error_of(request, exc))


for _kind in (APIError, engine_errors.EngineError, RequestValidationError, StarletteHTTPException, Exception):
    app.add_exception_handler(_kind, _error)
