"""The Anthropic Messages routes (POST /messages, POST /messages/count_tokens, under /v1 and
/api/v1): the same keys as the OpenAI routes (``x-api-key`` or ``Authorization: Bearer``),
``anthropic-version`` accepted whatever it says, and every error, a body's validation and a key's
refusal included, in Anthropic's shape (``{"type": "error", "error": {...}}``): the routes'
own class maps them, so no handler of the app needs to know which family a path belongs to."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from ..anthropic_schemas import CountTokensRequest, MessagesRequest
from ..errors import APIError, internal_error, to_api_error, validation_error_to_api_error
from ..serving.anthropic import AnthropicOperations, error_body, error_status
from .auth import check_api_key
from .responding import respond, while_connected

log = logging.getLogger("llmserve")


def error_response(exc: APIError) -> JSONResponse:
    """An APIError in Anthropic's shape and status (Retry-After kept)."""
    return JSONResponse(error_body(exc), status_code=error_status(exc), headers=exc.headers)


class AnthropicRoute(APIRoute):
    """A route whose errors, raised by its dependencies, its body's validation or its handler,
    answer in Anthropic's shape."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return error_response(validation_error_to_api_error(list(exc.errors())))
            except Exception as exc:
                err = to_api_error(exc)
                if err is None:
                    log.error("unexpected error on %s %s", request.method, request.url.path)
                    err = internal_error(exc)
                elif err.status >= 500:
                    log.error("%s %s -> %s: %s", request.method, request.url.path, err.status, err.message)
                return error_response(err)

        return handle


def anthropic_ops(request: Request) -> AnthropicOperations:
    return request.app.state.anthropic


router = APIRouter(route_class=AnthropicRoute, dependencies=[Depends(check_api_key)])


@router.post("/messages")
async def create_message(req: MessagesRequest, request: Request, a: AnthropicOperations = Depends(anthropic_ops)):
    return respond(await while_connected(request, a.create(req)))


@router.post("/messages/count_tokens")
async def count_tokens(req: CountTokensRequest, request: Request, a: AnthropicOperations = Depends(anthropic_ops)):
    return await while_connected(request, a.count_tokens(req))
