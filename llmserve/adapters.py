"""The LoRA adapters loaded on one loaded base model: which, how busy, which goes first.

The manager keeps one AdapterSet per loaded alias (its backend's), made when the base loads and
dropped with it (the engine forgets its adapters when it unloads). Loads and unloads of one base's
adapters run one at a time, never beside a forward pass of theirs: the engine's load_adapter /
unload_adapter (backends.base.Backend) is called with the set's lock held, and unload_adapter only
once no request runs with the adapter. Past limits.max_loaded_adapters a load unloads the least
recently used idle adapter first; when every one is busy the load is refused with a 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from backends import errors as engine_errors
from backends.base import Adapter, Backend

from .errors import APIError, InvalidRequest, to_api_error

log = logging.getLogger("llmserve")


class AdapterSet:
    def __init__(self, alias: str, backend: Backend, limit: int):
        self.alias, self.backend, self.limit = alias, backend, limit
        self.loaded: dict[str, float] = {}  # name -> when last used (monotonic)
        self.loaded_at: dict[str, float] = {}  # name -> when it loaded (epoch seconds)
        self.in_flight: dict[str, int] = {}  # name -> requests running with it
        self.errors: dict[str, str] = {}  # name -> why its last load failed
        self._lock = asyncio.Lock()
        self._draining: dict[str, asyncio.Event] = {}  # name -> set once its unload is over
        self.loading: set[str] = set()

    def served(self, name: str) -> str:
        return f"{self.alias}:{name}"

    async def load(self, adapter: Adapter) -> None:
        """Loads ``adapter`` unless it is loaded; everyone asking meanwhile waits for the one load."""
        while True:
            draining = self._draining.get(adapter.name)
            if draining is None:
                break
            await draining.wait()  # an unload of it drains: load it again once that is over
        if adapter.name in self.loaded:
            return
        async with self._lock:
            if adapter.name in self.loaded:
                return
            if not adapter.path.exists():
                raise InvalidRequest(f"Adapter {self.served(adapter.name)!r}: nothing at {adapter.path} (its "
                                     f"`adapters` entry in configuration.yaml).", param="model",
                                     code="adapter_not_found")
            if len(self.loaded) >= self.limit and not self._idle():
                raise self._full()
            self.loading.add(adapter.name)
            started = time.perf_counter()
            try:
                await self.backend.load_adapter(adapter)
            except (APIError, engine_errors.EngineError) as exc:
                err = to_api_error(exc)
                self.errors[adapter.name] = err.message
                log.error("loading adapter %s failed: %s", self.served(adapter.name), err.message)
                raise err from None
            finally:
                self.loading.discard(adapter.name)
            self.errors.pop(adapter.name, None)
            self.loaded[adapter.name] = time.monotonic()
            self.loaded_at[adapter.name] = time.time()
            # room is made once the new one has loaded, so that one that does not fit evicts nothing
            await self._make_room(adapter.name)
            log.info("loaded adapter %s in %.2f s (%d of at most %d on %s)", self.served(adapter.name),
                     time.perf_counter() - started, len(self.loaded), self.limit, self.alias)

    def _idle(self, but: str = "") -> list[str]:
        return [a for a in self.loaded if not self.in_flight.get(a) and a != but]

    def _full(self) -> APIError:
        return APIError(f"{len(self.loaded)} adapters are loaded on {self.alias!r} (limits.max_loaded_adapters is "
                        f"{self.limit}) and all are in use; retry later or unload one with POST "
                        "/models/{name}/unload.", status=503, type="server_error", code="too_many_adapters")

    async def _make_room(self, name: str) -> None:
        """Unloads least recently used idle adapters other than the new ``name`` (the lock held)
        while more than the limit are loaded; when the others all came into use during its load,
        the new one goes again and the load is refused."""
        while len(self.loaded) > self.limit:
            idle = self._idle(but=name)
            if not idle:
                await self._drop(name, "no room: every other adapter is in use")
                raise self._full()
            victim = min(idle, key=lambda a: self.loaded[a])
            await self._drop(victim, f"evicted: the least recently used idle adapter, to make room for "
                                     f"{self.served(name)}")

    async def _drop(self, name: str, reason: str) -> None:
        del self.loaded[name]
        self.loaded_at.pop(name, None)
        try:
            await self.backend.unload_adapter(name)
        except Exception as exc:  # noqa: BLE001 - the engine may have gone with it; logged only
            log.warning("unloading adapter %s: %s: %s", self.served(name), type(exc).__name__, exc)
        log.info("unloaded adapter %s (%s)", self.served(name), reason)

    async def unload(self, name: str) -> bool:
        """Unloads ``name`` once the requests running with it end (each bounded by the request
        limits); requests that come meanwhile wait, then load it again."""
        if name not in self.loaded or name in self._draining:
            return False
        drained = self._draining[name] = asyncio.Event()
        try:
            while self.in_flight.get(name):
                await asyncio.sleep(0.05)
            async with self._lock:
                if name in self.loaded:
                    await self._drop(name, "requested")
        finally:
            del self._draining[name]
            drained.set()
        return True

    @asynccontextmanager
    async def use(self, adapter: Adapter) -> AsyncIterator[None]:
        """Holds ``adapter`` loaded (it loads here if it is not) while a request runs with it."""
        # shielded: a client that leaves must not cut short a load halfway into the engine
        await asyncio.shield(self.load(adapter))
        # counted with no await since the load: nothing can evict it in between
        self.in_flight[adapter.name] = self.in_flight.get(adapter.name, 0) + 1
        try:
            yield
        finally:
            self.in_flight[adapter.name] -= 1
            if adapter.name in self.loaded:
                self.loaded[adapter.name] = time.monotonic()

    def row(self, name: str) -> dict[str, Any]:
        """What /models says of adapter ``name`` beyond its configuration."""
        last = self.loaded.get(name)
        return {"loaded": name in self.loaded, "loading": name in self.loading,
                "unloading": name in self._draining, "in_use": self.in_flight.get(name, 0),
                "loaded_at": self.loaded_at.get(name), "error": self.errors.get(name),
                "last_used": None if last is None else time.time() - (time.monotonic() - last)}


def not_loaded_row() -> dict[str, Any]:
    """An adapter row while its base is not loaded (its adapters are not either)."""
    return {"loaded": False, "loading": False, "unloading": False, "in_use": 0, "loaded_at": None, "error": None,
            "last_used": None}
