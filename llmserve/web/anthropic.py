"""The Anthropic Messages routes (POST /messages, POST /messages/count_tokens, under /v1 and
/api/v1): the same keys as the OpenAI routes (``x-api-key`` or ``Authorization: Bearer``),
``anthropic-version`` accepted whatever it says, and every error, a body's validation and a key's
refusal included, in Anthropic's shape (``{"type": "error", "error": {...}}``): the routes'
own class maps them, so no handler of the app needs to know which family a path belongs to."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from ..anthropic_schemas import CountTokensRequest, MessagesRequest
from ..errors import APIError
from ..serving.anthropic import AnthropicOperations, error_body, error_status
from .auth import check_api_key
from .responding import api_error_of, respond, while_connected


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
            except Exception as exc:  # mapped as on the OpenAI routes, written in Anthropic's shape
                return error_response(api_error_of(request, exc))

        return handle


# the paths whose refusals by the middlewares in front of the routes (keys of the native API, the
# body limit) are written in Anthropic's shape too
PATHS = [prefix + route for prefix in ("/v1", "/api/v1") for route in ("/messages", "/messages/count_tokens")]
ERRORS = dict.fromkeys([*PATHS, "/messages"], error_response)


def anthropic_ops(request: Request) -> AnthropicOperations:
    return request.app.state.anthropic


router = APIRouter(route_class=AnthropicRoute, dependencies=[Depends(check_api_key)])


@router.post("/messages")
async def create_message(req: MessagesRequest, request: Request, a: AnthropicOperations = Depends(anthropic_ops)):
    return respond(await while_connected(request, a.create(req)))


@router.post("/messages/count_tokens")
async def count_tokens(req: CountTokensRequest, request: Request, a: AnthropicOperations = Depends(anthropic_ops)):
    return await while_connected(request, a.count_tokens(req))
