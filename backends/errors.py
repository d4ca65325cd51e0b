"""What an engine raises, in its own terms: the client's input it cannot serve (naming the
field), its own failure, or its engine missing. The front end decides how each one looks to a
client (llmserve/errors.py maps them to OpenAI's errors and registers that mapping here, with
``set_translation``, so every error an engine raises is already the front end's own)."""

from __future__ import annotations

from typing import Callable, Optional


class EngineError(Exception):
    """Base of the errors below: a message, the request field at fault, a short code."""

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class BadInput(EngineError):
    """The request asks for something this engine cannot do with it (the client's mistake)."""


class EngineFailure(EngineError):
    """The engine could not finish the request (not the client's fault)."""


class NotInstalled(EngineFailure):
    """The alias needs an engine whose Python module is missing."""

    def __init__(self, backend: str, module: str, alias: str):
        super().__init__(f"Model {alias!r} needs the {backend} engine, but the Python module {module!r} is not "
                         "installed.", param="model", code="engine_not_installed")
        self.backend, self.module, self.alias = backend, module, alias


_translate: Callable[[EngineError], Exception] = lambda exc: exc


def set_translation(translate: Callable[[EngineError], Exception]) -> None:
    """How the front end wants engine errors to look (called once, by the front end)."""
    global _translate
    _translate = translate


def surface(exc: EngineError) -> Exception:
    """``exc`` as the front end shows it: ``raise surface(BadInput(...))``."""
    return _translate(exc)
