"""The manager's counts, in-process (an engine stand-in, as in tests/test_config_and_routing.py: these
are claims about the manager's bookkeeping, not about an engine): a model draining after its unload
still holds its place under limits.max_loaded_models and the memory budget until its engine is gone,
and admission (max_pending) counts the sequences a request asks for, not the request."""

from __future__ import annotations

import asyncio
import logging

import pytest

from backends.base import CHAT
from llmserve import manager as manager_mod
from llmserve.config import load_settings
from llmserve.errors import InvalidRequest, Overloaded
from llmserve.manager import ModelManager
from tests.test_config_and_routing import MINIMAL, FakeBackend, write

MIB = 1 << 20
BOUND = 10.0  # seconds any awaited condition below may take


class Engine(FakeBackend):
    """A stand-in whose engine is alive from load() until unload() has returned."""

    alive: set[str] = set()

    async def load(self):
        Engine.alive.add(self.alias)

    async def unload(self):
        await asyncio.sleep(0)  # an engine's shutdown takes a while: the others run meanwhile
        Engine.alive.discard(self.alias)


def manager(tmp_path, monkeypatch, extra: str) -> ModelManager:
    Engine.alive = set()
    monkeypatch.setattr(manager_mod, "make_backend", lambda alias, cfg: Engine(alias, cfg))
    return ModelManager(load_settings(write(tmp_path, MINIMAL + "  b: {source: b/b}\n  c: {source: c/c}\n" + extra)))


async def until(condition, what: str) -> None:
    async def poll():
        while not condition():
            await asyncio.sleep(0.005)
    try:
        await asyncio.wait_for(poll(), BOUND)
    except asyncio.TimeoutError:
        raise AssertionError(f"{what}, still after {BOUND:.0f} s") from None


async def hold(m: ModelManager, alias: str, release: asyncio.Event, sequences: int = 1) -> None:
    use = m.use(alias, CHAT) if sequences == 1 else m.use(alias, CHAT, sequences=sequences)  # both calls
    async with use:
        await release.wait()


@pytest.fixture
def lines():
    """What the manager logs (its own handler: the "llmserve" logger may not propagate)."""
    seen: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("llmserve")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield seen
    log.removeHandler(handler)
    log.setLevel(level)


def waits_for_drain(lines: list[str], alias: str, draining: str) -> bool:
    return any(line.startswith(f"loading {alias} waits for the unload of {draining}") for line in lines)


def row(m: ModelManager, alias: str) -> dict:
    return next(r for r in m.list_models() if r["id"] == alias)


async def load_c_while_a_drains(m):
    """A request held on a, a's unload (draining while it runs), then a load of c: the tasks, and
    the event that lets the request on a end."""
    release = asyncio.Event()
    request = asyncio.create_task(hold(m, "a", release))
    await until(lambda: m.list_models()[0]["in_use"] == 1, "the request on a never started")
    unloading = asyncio.create_task(m.unload("a"))
    await until(lambda: not row(m, "a")["loaded"], "a never started draining")
    return release, request, unloading, asyncio.create_task(m.load("c"))


def test_a_draining_model_holds_its_place_under_max_loaded_models_until_its_engine_is_gone(tmp_path, monkeypatch,
                                                                                           lines):
    """max_loaded_models 2: a and b loaded, a unloaded while a request runs on it. A load of c
    waits for a's engine to go (it evicts nothing: b stays), and never are three engines alive."""
    m = manager(tmp_path, monkeypatch, "limits: {max_loaded_models: 2, drain_timeout: 60}\n")
    most = [0]

    async def run():
        await m.load("a")
        await m.load("b")
        release, request, unloading, loading = await load_c_while_a_drains(m)

        async def watch():
            while True:
                most[0] = max(most[0], len(Engine.alive))
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        try:
            await until(lambda: waits_for_drain(lines, "c", "a") or loading.done(), "c's load never looked for room")
            assert not loading.done() and "c" not in Engine.alive, "c loaded while a still held its engine"
            assert not row(m, "a")["loaded"] and row(m, "a")["unloading"]  # what /models shows meanwhile
            assert set(m.loaded) == {"b"}, "b was evicted although a's drain frees a place"
            release.set()  # the request on a ends, so its drain does, then c loads
            await asyncio.wait_for(asyncio.gather(request, unloading, loading), BOUND)
        finally:
            watcher.cancel()
        assert not row(m, "a")["unloading"]
        return set(m.loaded), set(Engine.alive)

    assert asyncio.run(run()) == ({"b", "c"}, {"b", "c"})
    assert most[0] <= 2, f"{most[0]} engines alive at once under max_loaded_models 2"


def test_a_draining_model_counts_against_the_memory_budget_until_its_engine_is_gone(tmp_path, monkeypatch, lines):
    """The budget fits one model of 100 MiB. While a drains, its engine's memory is still in use:
    a load of c waits for it instead of being refused as if nothing were loaded."""
    base = 1000 * MIB
    m = manager(tmp_path, monkeypatch, f"limits: {{memory_budget_bytes: {base + 150 * MIB}, drain_timeout: 60}}\n")
    monkeypatch.setattr(manager_mod, "rss_bytes", lambda: base + 100 * MIB * len(Engine.alive))

    async def run():
        await m.load("a")
        m._measured["c"] = 100 * MIB  # what c took when it was last loaded
        release, request, unloading, loading = await load_c_while_a_drains(m)
        await until(lambda: waits_for_drain(lines, "c", "a") or loading.done(), "c's load never looked for room")
        assert not loading.done(), f"c's load ended while a still held its memory: {loading.exception()!r}"
        release.set()
        await asyncio.wait_for(asyncio.gather(request, unloading, loading), BOUND)
        return set(m.loaded)

    assert asyncio.run(run()) == {"c"}


def test_admission_counts_the_sequences_a_request_asks_for(tmp_path, monkeypatch):
    """max_pending 16: one request with n=16 fills it, so a request of one sequence gets a 429;
    two requests of 8 fit, a third of 1 does not; a request of 17 can never be admitted (400)."""
    m = manager(tmp_path, monkeypatch, "")
    m.settings.models["a"].max_pending = 16

    async def run():
        await m.load("a")
        release = asyncio.Event()
        sixteen = asyncio.create_task(hold(m, "a", release, sequences=16))
        await until(lambda: row(m, "a")["sequences_in_use"] == 16, "the n=16 request never started")
        assert row(m, "a")["in_use"] == 1  # one request, sixteen sequences
        with pytest.raises(Overloaded) as info:
            async with m.use("a", CHAT):  # the call without `sequences` counts one
                pass
        assert info.value.status == 429 and "16 sequences" in info.value.message
        release.set()
        await sixteen
        assert row(m, "a")["sequences_in_use"] == 0

        release = asyncio.Event()
        eights = [asyncio.create_task(hold(m, "a", release, sequences=8)) for _ in range(2)]
        await until(lambda: row(m, "a")["sequences_in_use"] == 16, "the two n=8 requests never started")
        with pytest.raises(Overloaded):
            async with m.use("a", CHAT, sequences=1):
                pass
        release.set()
        await asyncio.gather(*eights)

        with pytest.raises(InvalidRequest) as info:
            async with m.use("a", CHAT, sequences=17):
                pass
        assert info.value.status == 400 and info.value.param == "n" and "max_pending" in info.value.message
        async with m.use("a", CHAT, sequences=16):  # a full request fits an idle model
            assert row(m, "a")["sequences_in_use"] == 16
        return row(m, "a")

    last = asyncio.run(run())
    assert last["sequences_in_use"] == 0 and last["in_use"] == 0
