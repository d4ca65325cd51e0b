"""The ASGI middlewares in front of every route (pure ASGI, so they cost nothing per streamed
chunk): the body size limit, a byte order mark dropped, control characters in paths."""

from __future__ import annotations

from typing import Callable

from ..errors import APIError
from .responding import error_response


class BodyLimit:
    """A 413 for request bodies over limits.max_body_bytes, declared or streamed (pure ASGI)."""

    def __init__(self, app, limit: Callable[[], int], errors=None):
        # path -> how its 413 is written, for routes of another family than OpenAI's
        self.app, self.limit, self.errors = app, limit, errors or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit()
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        render = self.errors.get(scope.get("path", ""), error_response)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(send, limit, render)
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
            await self._too_large(send, limit, render)

    @staticmethod
    async def _too_large(send, limit: int, render) -> None:
        err = APIError(f"The request body is larger than this server's limit of {limit} bytes "
                       "(limits.max_body_bytes).", status=413, code="request_too_large")
        await render(err)({"type": "http"}, None, send)


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
