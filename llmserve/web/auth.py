"""API keys: which routes take which key (inference or admin), checked in constant time, for
the /v1 routes (FastAPI dependencies) and BentoML's native APIs (an ASGI middleware)."""

from __future__ import annotations

import hmac
from typing import Mapping
from urllib.parse import urlsplit

from fastapi import Request

from ..errors import APIError, Forbidden, Unauthorized
from ..manager import MAY_LOAD
from .responding import error_response


def _matches(key: bytes, keys: list[bytes]) -> bool:
    # compared in constant time, against every key (no early exit that a timing could reveal)
    return bool(key) and sum(hmac.compare_digest(key, k) for k in keys) > 0


def credentials(headers: Mapping[str, str]) -> str:
    """The key a request presents, as an Authorization value: ``Authorization: Bearer`` (OpenAI's
    clients), else ``x-api-key`` (Anthropic's SDK sends its key there)."""
    authorization = headers.get("authorization", "")
    if not authorization and headers.get("x-api-key"):
        return f"Bearer {headers['x-api-key']}"
    return authorization


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
        raise Unauthorized("Missing or wrong admin key: send `Authorization: Bearer <admin key>` (or `x-api-key`).",
                           code="invalid_api_key")
    if inference and not _matches(key, inference + admins):
        raise Unauthorized("Missing or wrong API key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`).",
                           code="invalid_api_key")


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
    check_keys(request.app.state.ops.settings, credentials(request.headers), admin=False)


def check_admin_key(request: Request) -> None:
    settings = request.app.state.ops.settings
    authorize(settings, credentials(request.headers), admin=True)
    refuse_cross_site(settings, request.headers)


def refuse_cross_site(settings, headers: Mapping[str, str]) -> None:
    """A 403 for a load or unload sent by another site's page in the operator's browser. With no
    keys set, such a request needs no preflight (a form POST) and would be obeyed; browsers say
    where a request comes from (Sec-Fetch-Site; Origin on a POST), other clients send neither.
    Origins listed in cors_origins are the operator's own and may."""
    origin = headers.get("origin")
    if origin is not None and origin in (settings.cors_origins or ()):
        return
    site = headers.get("sec-fetch-site")
    if site is not None:
        allowed = site in ("same-origin", "none")  # "none": typed by the user (a bookmark, the address bar)
    else:
        allowed = origin is None or urlsplit(origin).netloc == headers.get("host", "")
    if not allowed:
        raise Forbidden(f"Requests that can load or unload models are refused from another site's page (origin {origin!r}): "
                        "send it from this server's own console, from a client that is not a browser, or list "
                        "the origin in cors_origins.", code="cross_site_request")


class NativeAPIKeys:
    """The same keys for BentoML's native APIs (POST /chat, /load_model, ...), which do not
    pass through this app's routes (pure ASGI, in front of the BentoML service)."""

    ADMIN = {"/load_model", "/unload_model"}
    INFERENCE = {"/chat", "/complete", "/embed", "/respond", "/messages", "/rerank", "/v2/rerank", "/score", "/tokenize",
                 "/detokenize", "/list_models"}

    def __init__(self, app, settings, errors=None):
        # path -> how its refusals are written, for APIs of another family than OpenAI's
        self.app, self.settings, self.errors = app, settings, errors or {}

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and (path in self.ADMIN or path in self.INFERENCE):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
            try:
                check_keys(self.settings, credentials(headers), admin=path in self.ADMIN)
                # BentoML reads any body as JSON (text/plain too: no preflight), so a page of another
                # site could load a model on demand through /chat as well as through /load_model
                refuse_cross_site(self.settings, headers)
            except APIError as exc:
                return await self.errors.get(path, error_response)(exc)(scope, receive, send)
        await self.app(scope, receive, send)
