"""What one server process holds, started and stopped the same way under every platform:
the BentoML service (service.py) and the Modal class (modal_app.py) both go through Runtime,
so neither has request logic or start-up steps of its own."""

from __future__ import annotations

import asyncio
import logging

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from .config import Settings
from .logs import listening_address, log_startup, setup_logging
from .manager import ModelManager
from .serving import OpenAIOperations
from .serving.anthropic import AnthropicOperations
from .serving.batches import BatchOperations
from .serving.responses import ResponsesOperations
from .web.app import app
from .web import anthropic
from .web.middleware import BodyLimit, ControlCharacterPaths

log = logging.getLogger("llmserve")

class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.ray.export()  # before any engine starts
        self.manager = ModelManager(settings)
        self.ops = OpenAIOperations(self.manager, settings)
        app.state.ops = self.ops
        self.responses = ResponsesOperations(self.ops, settings)
        app.state.responses = self.responses
        self.anthropic = AnthropicOperations(self.ops)
        app.state.anthropic = self.anthropic
        self.batches = BatchOperations(self.ops, self.responses, settings)
        app.state.batches = self.batches
        self._preload: asyncio.Task | None = None
        _add_middleware(settings)

    async def start(self, wait: bool = False) -> None:
        """Logging, the start-up lines, and the preloaded models: in the background (the
        routes answer "loading" meanwhile) or, with ``wait``, before returning."""
        setup_logging(self.settings.log_level, self.settings.log_format)
        log_startup(self.manager.list_models(), self.settings.load_on_demand, self.settings.ui)
        if not self.settings.inference_keys() and not self.settings.admin_key_list():
            host, port = listening_address()
            log.warning("no API key is set (LLMSERVE_API_KEYS, LLMSERVE_ADMIN_KEYS): every route, model load and "
                        "unload included, is open to anyone who can reach %s:%d", host, port)
        self._preload = asyncio.create_task(self.manager.preload())
        self._expiry = asyncio.create_task(self.manager.expire_idle())
        await self.batches.start()  # resumes the batches a previous process left unfinished
        if wait:
            await self._preload

    def ready(self) -> bool:
        """Preloading is over, and the default model is not one whose engine died."""
        if self._preload is None or not self._preload.done():
            return False
        default = self.manager.loaded.get(self.settings.default_model)
        return default is None or default.failure() is None

    async def stop(self) -> None:
        if getattr(self, "_expiry", None):
            self._expiry.cancel()
        if self._preload is not None and not self._preload.done():
            self._preload.cancel()  # the alias it is loading still loads; shutdown() unloads it then
            await asyncio.gather(self._preload, return_exceptions=True)
        await self.batches.stop()  # its running lines stay queued in the store for the next start
        await self.manager.shutdown()
        self.responses.close()

    def asgi_app(self):
        """The HTTP surface with /livez and /readyz of its own, for platforms that (unlike
        BentoML) do not add them."""

        async def livez(_: Request) -> PlainTextResponse:
            return PlainTextResponse("ok")

        async def readyz(_: Request) -> PlainTextResponse:
            ok = self.ready()
            return PlainTextResponse("ok" if ok else "loading", status_code=200 if ok else 503)

        return ControlCharacterPaths(
            Starlette(routes=[Route("/livez", livez), Route("/readyz", readyz), Mount("/", app=app)]))


_middleware_added = False


def _add_middleware(settings: Settings) -> None:
    """The body size limit, and CORS only for configured origins (off by default). Once per
    process: the app is a module-level object (tests start several runtimes in one process)."""
    global _middleware_added
    if _middleware_added:
        return
    _middleware_added = True
    app.add_middleware(BodyLimit, limit=lambda: app.state.ops.settings.limits.max_body_bytes,
                       errors=anthropic.ERRORS)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        # any request header: browser clients send their own (the OpenAI JS client sends
        # x-stainless-*, openai-organization, openai-project ...); the origins are what is guarded
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"])
