"""Routes a model name to a loaded backend: chooses the engine, loads, unloads, evicts. A name is
an alias, or "<alias>:<adapter>", a LoRA adapter on that alias's base (llmserve/adapters.py keeps
the adapters of each loaded base: loaded on first use or by hand, evicted least recently used)."""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import logging
import time
from contextlib import asynccontextmanager, nullcontext
from typing import Any, AsyncIterator, Optional

from backends import errors as engine_errors
from backends.base import Backend

from .adapters import AdapterSet, not_loaded_row
from .config import ENGINE_MODULES, ModelConfig, Settings, engine_installed
from .errors import (APIError, EngineError, EngineNotInstalled, Forbidden, InvalidRequest, ModelNotFound, Overloaded,
                     to_api_error)
from .logs import gpu_bytes, mib, rss_bytes
from .metrics import MODEL_LOAD_SECONDS, engine_counter

log = logging.getLogger("llmserve")

# whether the request being served may load a model (set by the HTTP layer from its key):
# with limits.load_on_demand_requires_admin, only a caller who could POST /models/{name}/load
# may make a request load one on demand
MAY_LOAD: contextvars.ContextVar[bool] = contextvars.ContextVar("llmserve_may_load", default=True)

# backend name -> (module, class); the engine each needs is config.ENGINE_MODULES'
BACKENDS = {
    "llamacpp": ("backends.llamacpp_backend", "LlamaCppBackend"),
    "transformers": ("backends.transformers_backend", "TransformersBackend"),
    "vllm": ("backends.vllm_backend", "VllmBackend"),
}


def make_backend(alias: str, config: ModelConfig) -> Backend:
    """The backend ``config.chosen_backend()`` names (the one choice the configuration's pending
    limit and GPUs follow too), not loaded yet."""
    name = config.chosen_backend()
    if name not in BACKENDS:  # "package.module:Class", an engine of the user's own
        module, _, cls = name.partition(":")
        return getattr(importlib.import_module(module), cls)(alias, config)
    module, cls = BACKENDS[name]
    if not engine_installed(name):
        raise EngineNotInstalled(name, ENGINE_MODULES[name], alias)
    return getattr(importlib.import_module(module), cls)(alias, config)


class ModelManager:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.loaded: dict[str, Backend] = {}
        # loads, unloads and evictions, of every alias, one at a time: room is made and taken
        # under one lock, so two loads cannot both pass max_loaded_models or the memory budget,
        # and an eviction cannot run beside a new load of its victim
        self._lock = asyncio.Lock()
        self._in_flight: dict[str, int] = {a: 0 for a in settings.models}  # requests holding each alias
        self._sequences: dict[str, int] = {a: 0 for a in settings.models}  # their sequences (n each): max_pending
        self._last_used: dict[str, float] = {}
        self._measured: dict[str, int] = {}  # resident memory each alias's last load took
        self._loading: dict[str, float] = {}  # alias -> when its load started (epoch seconds)
        self._waiting: dict[str, int] = {a: 0 for a in settings.models}  # requests waiting for a load
        self._loaded_at: dict[str, float] = {}
        self._memory: dict[str, dict[str, int | None]] = {}  # what each load took
        self.errors: dict[str, str] = {}  # alias -> why its last load failed
        self._pending: dict[str, asyncio.Future] = {}  # alias -> its load in progress, awaited by all who want it
        # alias -> set once its unload (drain, then drop) is over; until then its engine still holds
        # its memory, so it counts against max_loaded_models and the memory budget like a loaded one
        self._unloading: dict[str, asyncio.Event] = {}
        self._adapters: dict[str, AdapterSet] = {}  # alias -> the adapters loaded on its loaded backend

    # -- lookup -------------------------------------------------------------------------
    def resolve(self, name: str) -> tuple[str, Optional[str]]:
        """(alias, adapter) of a model name: an alias (adapter None) or "<alias>:<adapter>"."""
        alias, adapter = self.settings.served_name(name)
        if alias is None:
            raise ModelNotFound(name, self.settings.model_names())
        return alias, adapter

    def config(self, name: str) -> ModelConfig:
        """The configuration of an alias, or of the base of an adapter's name."""
        return self.settings.models[self.resolve(name)[0]]

    def list_models(self) -> list[dict[str, Any]]:
        rows = []
        for alias, cfg in self.settings.models.items():
            backend = self.loaded.get(alias)
            row = {
                "id": alias,
                "object": "model",
                "created": 0,
                "owned_by": "llmserve",
                "backend": cfg.chosen_backend(),
                "task": cfg.task,
                "score_type": cfg.score_type(),  # how /v1/rerank and /v1/score serve it (None: they do not)
                "loaded": backend is not None,
                "loading": alias in self._loading,
                "loading_since": self._loading.get(alias),
                "waiting_for_load": self._waiting[alias],
                "in_use": self._in_flight[alias],  # requests holding it (running, queued or streaming)
                "sequences_in_use": self._sequences[alias],  # their choices (n each), what max_pending counts
                "unloading": alias in self._unloading,  # draining: not taking requests, still holding its engine
                "error": self.errors.get(alias),
                "source": cfg.source or f"{cfg.package.package}/{cfg.package.path}",
                "root": cfg.source or f"{cfg.package.package}/{cfg.package.path}",  # vLLM's card: the weights
                "parent": None,  # a base model (adapters name theirs)
                "preload": cfg.preload,
            }
            if backend is not None:
                last = self._last_used.get(alias)
                row.update(loaded_at=self._loaded_at.get(alias), memory=self._memory.get(alias),
                           last_used=None if last is None else time.time() - (time.monotonic() - last),
                           queued_requests=0)
                row.update(backend.describe())
                if backend.failure():
                    row["error"] = backend.failure()
            rows.append(row)
            rows.extend(self._adapter_rows(alias, cfg, row))
        return rows

    def _adapter_rows(self, alias: str, cfg: ModelConfig, base: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows of ``alias``'s adapters, as vLLM lists LoRA modules: id, root (the adapter's
        files), parent (the base); and their state on the loaded base."""
        loaded = self._adapters.get(alias) if base["loaded"] else None
        rows = []
        for name, adapter in cfg.adapters.items():
            row = {"id": f"{alias}:{name}", "object": "model", "created": 0, "owned_by": "llmserve",
                   "root": str(adapter.path), "parent": alias, "adapter": name, "backend": base["backend"],
                   "task": cfg.task, "score_type": None, "source": str(adapter.path), "preload": False}
            row.update(loaded.row(name) if loaded is not None else not_loaded_row())
            rows.append(row)
        return rows

    # -- lifecycle ----------------------------------------------------------------------
    async def expire_idle(self, period: float = 1.0) -> None:
        """Unloads aliases idle for longer than their keep_alive (as Ollama does); runs for
        the life of the server. A request for one later loads it again (load_on_demand)."""
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for alias, backend in list(self.loaded.items()):
                keep = self.settings.models[alias].keep_alive
                idle = now - self._last_used.get(alias, now)
                if keep is not None and not self._in_flight[alias] and idle > keep:
                    await self.unload(alias, drain_timeout=0, reason=f"idle for {idle:.0f} s, keep_alive {keep:g} s",
                                      only_if_idle=True)

    async def preload(self) -> None:
        """Loads the preload aliases; one that fails is logged and listed with its error,
        and the others still load."""
        for alias, cfg in self.settings.models.items():
            if cfg.preload:
                try:
                    await self.load(alias)
                except Exception:
                    pass  # load() logged why; GET /models lists it

    async def load(self, name: str) -> dict[str, Any]:
        """Loads model ``name``: an alias, or an adapter (its base first, if it is not loaded)."""
        alias, adapter = self.resolve(name)
        info = await self._load_base(alias)
        if adapter is None:
            return info
        adapters = self._adapters.get(alias)
        if adapters is None:  # unloaded again at once
            raise APIError(f"Model {alias!r} was unloaded while loading; retry.", status=503, type="server_error")
        # shielded: an admin who leaves must not cut a load short halfway into the engine
        await asyncio.shield(adapters.load(self.settings.models[alias].adapters[adapter]))
        return next(r for r in self._adapter_rows(alias, self.settings.models[alias], {"loaded": True,
                    "backend": adapters.backend.name}) if r["adapter"] == adapter)

    async def _load_base(self, alias: str) -> dict[str, Any]:
        """Loads ``alias`` once for everyone who asks meanwhile: they all get its one result (a
        failure too), and one who leaves does not cut it short."""
        cfg = self.config(alias)
        backend = self.loaded.get(alias)
        if backend is not None and backend.failure() is None:  # no lock: another alias may be draining
            return backend.describe()
        pending = self._pending.get(alias)
        if pending is None:
            pending = self._pending[alias] = asyncio.ensure_future(self._load(alias, cfg))
            pending.add_done_callback(lambda done: self._loaded(alias, done))
        return await asyncio.shield(pending)

    def _loaded(self, alias: str, done: asyncio.Future) -> None:
        if self._pending.get(alias) is done:
            del self._pending[alias]
        if not done.cancelled():
            done.exception()  # retrieved here: a failure nobody awaits any more is not reported twice

    async def _load(self, alias: str, cfg: ModelConfig) -> dict[str, Any]:
        while True:
            unloading = self._unloading.get(alias)
            if unloading is not None:  # its unload is draining: load it again once that is over
                await unloading.wait()
                continue
            async with self._lock:
                if alias in self.loaded and self.loaded[alias].failure() is None:
                    return self.loaded[alias].describe()
                if alias in self.loaded:  # its engine died: what is left is shut down, then a fresh load
                    log.warning("reloading %s: %s", alias, self.loaded[alias].failure())
                    await self._drop(alias, self.loaded.pop(alias), "engine failed")
                drain = await self._make_room(alias)
                if drain is None:
                    return await self._start(alias, cfg)
            # room is held by a model still draining: wait for its engine to go, without the lock
            # (its unload takes the lock to drop it), then look again
            log.info("loading %s waits for the unload of %s to end (%s)", alias, drain[0], drain[2])
            await drain[1].wait()

    async def _start(self, alias: str, cfg: ModelConfig) -> dict[str, Any]:
        """Starts ``alias``'s engine, the lock held and room made."""
        self._loading[alias] = time.time()
        started = time.perf_counter()
        rss, gpu = rss_bytes(), gpu_bytes()
        try:
            backend = make_backend(alias, cfg)
            backend.count = engine_counter(alias)
            if cfg.speculative is not None and cfg.speculative.method not in backend.speculative_methods:
                served = ", ".join(sorted(backend.speculative_methods)) or "none"
                raise engine_errors.BadInput(
                    f"Model {alias!r}: the {backend.name} engine does not serve speculative decoding by "
                    f"{cfg.speculative.method!r} here (it serves: {served}); remove `speculative` or serve the "
                    "alias on vLLM.", param="speculative")
            log.info("loading %s (%s) ...", alias, backend.name)
            await backend.load()
        except (APIError, engine_errors.EngineError) as exc:  # the configuration's mistake: one line
            err = to_api_error(exc)
            self.errors[alias] = err.message
            log.error("loading %s failed: %s", alias, err.message)
            raise err
        except Exception as exc:
            self.errors[alias] = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, FileNotFoundError):  # model files missing: the reason says it all
                log.error("loading %s failed: %s", alias, self.errors[alias])
            else:  # the engine itself failed: its stack trace helps
                log.exception("loading %s failed: %s", alias, self.errors[alias])
            raise EngineError(f"Loading model {alias!r} failed: {self.errors[alias]}") from exc
        finally:
            self._loading.pop(alias, None)
        seconds = time.perf_counter() - started
        MODEL_LOAD_SECONDS.labels(model=alias).observe(seconds)
        gpu_now = gpu_bytes()
        self._memory[alias] = {"rss_bytes": max(0, rss_bytes() - rss),
                               "gpu_bytes": None if gpu is None or gpu_now is None else max(0, gpu_now - gpu)}
        self.errors.pop(alias, None)
        self.loaded[alias] = backend
        self._adapters[alias] = AdapterSet(alias, backend, self.settings.limits.max_loaded_adapters)
        self._measured[alias] = max(0, self._memory[alias]["rss_bytes"] or 0)
        self._loaded_at[alias] = time.time()
        self._last_used[alias] = time.monotonic()
        waited = self._waiting[alias]
        log.info("loaded %s (%s) in %.1f s, memory +%s RSS, GPU +%s%s", alias, backend.name, seconds,
                 mib(self._memory[alias]["rss_bytes"]), mib(self._memory[alias]["gpu_bytes"]),
                 f"; {waited} request(s) waited for it" if waited else "")
        return backend.describe()

    async def unload(self, alias: str, drain_timeout: float | None = None, reason: str = "requested",
                     only_if_idle: bool = False) -> bool:
        """Unloads ``alias`` once its running requests finish, or after ``drain_timeout``
        (limits.drain_timeout) ends the rest with an error event. ``only_if_idle``: not when
        a request came while the lock was awaited. An adapter's name unloads that adapter alone,
        once its requests end (AdapterSet.unload); the base's unload takes its adapters with it."""
        alias, adapter = self.resolve(alias)
        if adapter is not None:
            adapters = self._adapters.get(alias)
            return adapters is not None and await adapters.unload(adapter)
        if drain_timeout is None:
            drain_timeout = self.settings.limits.drain_timeout
        async with self._lock:
            keep = self.settings.models[alias].keep_alive
            if only_if_idle and (self._in_flight[alias] or keep is None
                                 or time.monotonic() - self._last_used.get(alias, 0) <= keep):
                return False  # used while the lock was awaited
            backend = self.loaded.pop(alias, None)
            if backend is None:
                return False
            drained = self._unloading[alias] = asyncio.Event()
        try:
            # let requests already running on it finish, without the lock: other aliases load meanwhile
            deadline = time.monotonic() + drain_timeout
            while self._in_flight[alias] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            async with self._lock:
                await self._drop(alias, backend, reason)
        finally:
            del self._unloading[alias]
            drained.set()
        return True

    async def _drop(self, alias: str, backend: Backend, reason: str) -> None:
        """Unloads ``backend`` of ``alias`` (the lock held); an engine that died may fail to
        shut down cleanly, which only gets logged."""
        try:
            await backend.unload()
        except Exception as exc:
            log.warning("unloading %s: %s: %s", alias, type(exc).__name__, exc)
        self._forget(alias)
        log.info("unloaded %s (%s)", alias, reason)

    def _forget(self, alias: str) -> None:
        self._loaded_at.pop(alias, None)
        self._memory.pop(alias, None)
        self._adapters.pop(alias, None)  # the engine's adapters went with it

    async def shutdown(self) -> None:
        """Unloads every alias, those whose load is still running once it ends; running streams
        get drain_timeout, all aliases at once."""
        while self.loaded or self._pending or self._unloading:
            await asyncio.gather(*self._pending.values(), *(e.wait() for e in self._unloading.values()),
                                 *(self.unload(a, reason="server shutting down") for a in list(self.loaded)),
                                 return_exceptions=True)

    async def _make_room(self, alias: str) -> tuple[str, asyncio.Event, str] | None:
        """Makes room for ``alias`` (the lock held): None once the loaded-model limit and the memory
        budget leave room, unloading least recently used idle models for it; or (alias, event, why)
        of a model still draining that holds the room, to wait for (the lock released) before
        looking again: it gives its engine up within limits.drain_timeout, and waiting for it spares
        a model someone else may still want from eviction. Refuses the load when neither can
        make room."""
        limits = self.settings.limits
        while len(self.loaded) + len(self._unloading) >= limits.max_loaded_models:
            why = f"limits.max_loaded_models is {limits.max_loaded_models}"
            if self._unloading:
                return self._a_drain(why)
            await self._evict_one(alias, why, f"{limits.max_loaded_models} models are loaded "
                                  "(limits.max_loaded_models) and all are busy", "too_many_models")
        budget = limits.memory_budget_bytes
        if budget is None:
            return None
        need = self._expected_memory(alias)
        while rss_bytes() + need > budget:
            why = f"the memory budget is {mib(budget)}"
            if self._unloading:
                return self._a_drain(why)
            if not self.loaded:
                raise APIError(f"Loading {alias!r} needs about {mib(need)} but the memory budget is {mib(budget)} "
                               f"(limits.memory_budget_bytes) and {mib(rss_bytes())} is in use with no model loaded; "
                               "raise the budget or pick a smaller model.", status=507, type="server_error",
                               code="memory_budget")
            await self._evict_one(alias, why,
                                  f"Loading {alias!r} needs about {mib(need)} beyond the {mib(rss_bytes())} in use, "
                                  f"over the memory budget of {mib(budget)} (limits.memory_budget_bytes), and every "
                                  "loaded model is busy", "memory_budget", status=507)
        return None

    def _a_drain(self, why: str) -> tuple[str, asyncio.Event, str]:
        draining, done = next(iter(self._unloading.items()))
        return draining, done, why

    def _expected_memory(self, alias: str) -> int:
        """What loading ``alias`` took last time in this process, else its files' size."""
        seen = self._measured.get(alias)
        return seen if seen is not None else self.config(alias).size_on_disk()

    async def _evict_one(self, alias: str, why: str, refusal: str, code: str, status: int = 503) -> None:
        idle = [a for a in self.loaded if not self._in_flight[a] and a != alias]
        if not idle:
            raise APIError(f"{refusal}; retry later or unload one with POST /models/{{name}}/unload.",
                           status=status, type="server_error", code=code)
        victim = min(idle, key=lambda a: self._last_used.get(a, 0))
        await self._drop(victim, self.loaded.pop(victim),
                         f"evicted: the least recently used idle model, to make room for {alias}; {why}")

    # -- serving ------------------------------------------------------------------------
    @asynccontextmanager
    async def use(self, name: str, capability: Optional[str], sequences: int = 1) -> AsyncIterator[Backend]:
        """The loaded backend for model ``name``, checked for ``capability`` (None: any alias serves it,
        e.g. tokenizing), counted as busy: one request of ``sequences`` sequences (a request's ``n``
        choices), which is what max_pending counts, as each is a sequence the engine decodes. For an
        adapter's name, its base's backend with the adapter loaded and held for the request
        (generations run with it through SamplingParams.adapter: see adapter_of)."""
        alias, adapter = self.resolve(name)
        cfg = self.config(alias)
        backend = self.loaded.get(alias)
        if backend is None:
            if not self.settings.load_on_demand:
                raise InvalidRequest(
                    f"Model {alias!r} is configured but not loaded. Load it with "
                    f"POST /models/{alias}/load (load_on_demand is off).",
                    param="model",
                    code="model_not_loaded",
                )
            if self.settings.limits.load_on_demand_requires_admin and not MAY_LOAD.get():
                raise Forbidden(f"Model {alias!r} is not loaded, and loading one on demand needs an admin key "
                                f"(limits.load_on_demand_requires_admin); ask an admin to POST /models/{alias}/load.",
                                param="model", code="model_not_loaded")
            self._waiting[alias] += 1
            try:
                # shielded: a client that leaves (its request cancelled) must not cut short a load
                # that other requests wait for, halfway through starting an engine
                await asyncio.shield(self._load_base(alias))
            finally:
                self._waiting[alias] -= 1
            backend = self.loaded.get(alias)
            if backend is None:  # unloaded again while we waited
                raise APIError(f"Model {alias!r} was unloaded while loading; retry.", status=503, type="server_error")
        failure = backend.failure()
        if failure:
            self.errors[alias] = failure
            raise EngineError(f"Model {alias!r} cannot serve: {failure}. POST /models/{alias}/load starts it "
                              "again.", status=503, code="engine_failed")
        if capability is not None and capability not in backend.capabilities():
            can = ", ".join(sorted(backend.capabilities())) or "nothing"
            raise InvalidRequest(
                f"Model {alias!r} ({backend.name}, task {cfg.task}) does not support {capability}; "
                f"it supports: {can}. Pick a model that does (GET /v1/models lists them).",
                param="model",
                code="unsupported_capability",
            )
        limit = cfg.pending_limit()
        if sequences > limit:  # never admitted, however long the client waits: not a 429
            raise InvalidRequest(f"This request asks for {sequences} sequences (n) but model {alias!r} runs or queues "
                                 f"at most {limit} at once (max_pending); ask for fewer.", param="n",
                                 code="n_over_max_pending")
        running = self._sequences[alias]
        if running + sequences > limit:
            raise Overloaded(f"Model {alias!r} has {running} sequences running or queued; {sequences} more would pass "
                             f"its limit of {limit} (max_pending); retry shortly.")
        holding = nullcontext()
        if adapter is not None and sequences:  # tokenizing (no sequences) needs only the base
            holding = self._holding_adapter(alias, backend, adapter)
        self._in_flight[alias] += 1
        self._sequences[alias] += sequences
        self._last_used[alias] = time.monotonic()
        try:
            async with holding:
                yield backend
        finally:
            self._in_flight[alias] -= 1
            self._sequences[alias] -= sequences
            self._last_used[alias] = time.monotonic()  # idle time counts from the end of the last request

    def _holding_adapter(self, alias: str, backend: Backend, adapter: str):
        """The adapter loaded on ``backend`` and held while a request runs with it; loading it on
        demand follows the rules a base's load does (load_on_demand, admin keys)."""
        adapters = self._adapters.get(alias)
        if adapters is None or adapters.backend is not backend:
            raise APIError(f"Model {alias!r} was unloaded while loading; retry.", status=503, type="server_error")
        if adapter not in adapters.loaded:
            served = f"{alias}:{adapter}"
            if not self.settings.load_on_demand:
                raise InvalidRequest(f"Adapter {served!r} is configured but not loaded. Load it with POST "
                                     f"/models/{served}/load (load_on_demand is off).", param="model",
                                     code="model_not_loaded")
            if self.settings.limits.load_on_demand_requires_admin and not MAY_LOAD.get():
                raise Forbidden(f"Adapter {served!r} is not loaded, and loading one on demand needs an admin key "
                                f"(limits.load_on_demand_requires_admin); ask an admin to POST /models/{served}/load.",
                                param="model", code="model_not_loaded")
        return adapters.use(self.settings.models[alias].adapters[adapter])

    def adapter_of(self, name: str) -> Optional[str]:
        """The adapter a model name runs with (SamplingParams.adapter), None for an alias."""
        return self.resolve(name)[1]
