"""What an engine raises, in its own terms: the client's input it cannot serve (naming the
field), its own failure, or its engine missing. The front end decides how each one looks to a
client (llmserve/errors.py maps them to OpenAI's errors where it catches them)."""

from __future__ import annotations

from typing import Optional


class EngineError(Exception):
    """Base of the errors below: a message for the client, the request field at fault, a short
    code, and ``detail``: what went wrong inside (for the log, never shown to a client).
    ``index``: where an engine given a list of inputs (texts, pairs) names one of them, its
    position in that list (``param[index]`` in the message), for a caller whose request held the
    inputs in another order to name its own field."""

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 detail: Optional[str] = None, index: Optional[int] = None):
        super().__init__(message if detail is None else f"{message} ({detail})")
        self.message, self.param, self.code, self.detail, self.index = message, param, code, detail, index


class BadInput(EngineError):
    """The request asks for something this engine cannot do with it (the client's mistake)."""


class EngineFailure(EngineError):
    """The engine could not finish the request (not the client's fault)."""


class Unloaded(EngineFailure):
    """The model was unloaded before or while this request ran: nothing wrong with the request,
    and the next one loads the model again (a front end answers it as "retry")."""

    def __init__(self, message: str = "The model was unloaded while this request ran; retry.",
                 detail: Optional[str] = None):
        super().__init__(message, code="model_unloaded", detail=detail)


class NotInstalled(EngineFailure):
    """The alias needs an engine whose Python module is missing."""

    def __init__(self, backend: str, module: str, alias: str):
        super().__init__(f"Model {alias!r} needs the {backend} engine, but the Python module {module!r} is not "
                         "installed.", param="model", code="engine_not_installed")
        self.backend, self.module, self.alias = backend, module, alias
