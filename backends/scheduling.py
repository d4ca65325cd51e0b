"""How engines run requests off the event loop: one thread per engine (EngineThread), the
step loop of the batching engines (StepLoop: admit, one batched step, emit), and the batcher
that joins concurrent embedding or scoring requests (InputBatcher)."""

from __future__ import annotations

import abc
import asyncio
import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from . import faults
from .base import ADMITTED, Delta, SamplingParams
from .errors import EngineError, EngineFailure, Unloaded

log = logging.getLogger("llmserve")


class InputBatcher:
    """Joins concurrent embedding (or cross-encoder scoring) requests to one model into one
    forward pass: each request's inputs (texts, or (query, document) pairs), and its slice of the
    batch's answer (an Embeddings or Scores: ``part``) back.

    While the engine computes one batch, the requests that arrive wait and then go in
    together (up to ``max_inputs``), so a lone request never waits for a window and a busy
    model batches by itself. A batch that fails is retried request by request, so one bad
    input fails only the request that sent it.
    """

    def __init__(self, run: Callable[[list[Any]], Awaitable[Any]], max_inputs: int = 256):
        self._run, self._max = run, max_inputs
        self._hold = faults.hold_from_env()  # None unless a test holds the passes (faults.Hold)
        self._queue: list[tuple[list[Any], asyncio.Future]] = []
        self._draining = False
        self.batches = 0  # forward passes so far (for tests and describe)
        self.running = 0  # requests waiting for or in a forward pass

    async def run(self, inputs: list[Any]) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((inputs, future))
        if not self._draining:
            self._draining = True
            asyncio.ensure_future(self._drain())
        self.running += 1
        try:
            return await future
        finally:
            self.running -= 1

    async def _drain(self) -> None:
        try:
            while self._queue:
                group, size = [], 0
                while self._queue and (not group or size + len(self._queue[0][0]) <= self._max):
                    inputs, future = self._queue.pop(0)
                    if not future.done():  # a client that left is skipped
                        group.append((inputs, future))
                        size += len(inputs)
                if group:
                    if self._hold is not None:
                        await self._hold.passed()
                    await self._run_group(group)
        finally:
            self._draining = False

    async def _run_group(self, group) -> None:
        self.batches += 1
        try:
            result = await self._run([text for inputs, _ in group for text in inputs])
        except BaseException as exc:
            if len(group) == 1:
                if not group[0][1].done():
                    group[0][1].set_exception(exc)
                return
            for item in group:  # find the request that failed; the others get their answer
                await self._run_group([item])
            return
        start = 0
        for inputs, future in group:
            end = start + len(inputs)
            if not future.done():
                future.set_result(result.part(start, end))
            start = end


@dataclass
class StepRequest:
    """One generation inside a StepLoop: what to run and where its deltas go."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[object], None]  # thread-safe: hands a Delta or an exception to the client
    extra: Any = None  # what the engine prepared for this request beside its params (a grammar)
    cancelled: bool = False

    def admitted(self) -> None:
        """Tells the client its request left the queue for the batch (base.ADMITTED): an engine's
        _admit calls it once per request it admits."""
        self.emit(ADMITTED)

    def fail(self, exc: Exception) -> None:
        """Ends this request alone with ``exc``: a neutral engine error as it is (a BadInput
        stays the client's mistake), anything else as this request's engine failure."""
        if not isinstance(exc, EngineError):
            exc = EngineFailure("The engine failed on this request.", detail=f"{type(exc).__name__}: {exc}")
        self.emit(exc)


class StepLoop(abc.ABC):
    """The batching engines' scheduler: one thread owns the engine's batch state and moves
    every running request forward one token per step (iteration-level batching).

    Requests arrive on a queue; each step the loop drops what was cancelled, admits what
    waits (``_admit``) and runs one batched step (``_step``). The thread is the only thing
    that touches the engine's state, so no lock is held while the engine computes; an idle
    loop sleeps on the queue.

    Failures stay with their request: an engine's ``_admit`` and ``_step`` end a request whose
    admission, sampling or detokenizing raised with ``StepRequest.fail`` and go on; what
    escapes them (a failed forward pass) ends the running batch; a loop thread that dies
    answers every request it holds at once and sets ``failure`` (the backend reports it, and
    the model is loaded again).
    """

    failure: Optional[str] = None  # why the loop thread stopped, once it has

    def __init__(self, name: str):
        self._pending: queue.Queue = queue.Queue()
        self._waiting: list[StepRequest] = []  # off the queue, not admitted yet
        self._closed = False
        self._faults = faults.from_env()  # None unless a test asks for faults
        # what the loop thread emitted this step: (event loop, queue, request, item), handed
        # over at the step's end with one wake-up per event loop, not one per token
        self._outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, StepRequest, object]] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- what each engine's loop provides ---------------------------------------------------
    @abc.abstractmethod
    def running(self) -> int:
        """Requests admitted into the batch."""

    @abc.abstractmethod
    def _drop_cancelled(self) -> None:
        """Frees the batch entries of cancelled requests."""

    @abc.abstractmethod
    def _admit(self) -> None:
        """Moves waiting requests (self._waiting) into the batch while there is room."""

    @abc.abstractmethod
    def _step(self) -> None:
        """One batched forward pass; emits a Delta to every request that got a token."""

    @abc.abstractmethod
    def _fail_running(self, error: Exception) -> None:
        """Ends every admitted request with ``error`` and clears the batch."""

    def _free(self) -> None:
        """Releases the engine's resources once the thread has stopped."""

    # -- the event loop's side ----------------------------------------------------------------
    async def stream(self, prompt: list[int], params: SamplingParams, extra: Any = None) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        if self.failure is not None or self._closed:  # nothing would ever answer: not queued, not counted
            raise self._unavailable()

        def emit(item) -> None:
            if threading.current_thread() is self._thread:  # a step's deltas go to the loop together
                self._outbox.append((loop, deltas, request, item))
                return
            try:
                loop.call_soon_threadsafe(deltas.put_nowait, item)
            except RuntimeError:  # its event loop is closed: nobody is left to answer
                request.cancelled = True

        request = StepRequest(list(prompt), params, emit, extra)
        self._pending.put(request)
        if self.failure is not None or self._closed:  # it closed or died while this was queued
            self._answer_pending(self._unavailable())
        finished = False
        try:
            while True:
                item = await deltas.get()
                if isinstance(item, BaseException):
                    finished = True  # the loop already let go of it
                    raise item
                finished = item.finish_reason is not None  # the loop freed its slot itself
                yield item
                if finished:
                    return
        finally:
            if not finished:  # client gone or stop found: the slot frees at the next step
                request.cancelled = True
                self._pending.put(None)  # wakes an idle loop

    def _unavailable(self) -> EngineError:
        if self.failure is not None:
            return EngineFailure("The engine cannot serve this request now.", detail=self.failure)
        return Unloaded("The model was unloaded before this request started.")

    def queued(self) -> int:
        with self._pending.mutex:  # requests only, not the None that wakes the loop after a cancel
            pending = sum(item is not None for item in self._pending.queue)
        return len(self._waiting) + pending

    def busy(self) -> int:
        return self.running() + self.queued()

    def close(self) -> None:
        self._closed = True
        self._pending.put(None)
        self._thread.join()
        self._fail_running(Unloaded("The model was unloaded while this request ran."))
        self._answer_pending(Unloaded("The model was unloaded before this request started."))
        self._free()

    def _answer_pending(self, error: EngineError) -> None:
        """Answers every request not admitted (queued or waiting) with ``error``: for a loop
        that will not take them any more. Safe from any thread: each request leaves the queue once."""
        self._take_pending(block=False)
        waiting, self._waiting = self._waiting, []
        for request in waiting:
            request.emit(error)

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - the loop is gone: say so to everyone waiting
            self._died(exc)
        finally:
            self._hand_over()

    def _serve(self) -> None:
        while not self._closed:
            self._take_pending(block=not self.running() and not self._waiting)
            if self._closed:
                return
            if self._faults is not None:
                self._faults.check_any("loop", (r.params.seed for r in self._waiting))
            try:
                self._waiting = [r for r in self._waiting if not r.cancelled]
                self._drop_cancelled()
                self._admit()
                self._step()
            except Exception as exc:  # a forward pass failed: its batch ends, the loop goes on
                log.exception("%s: a step failed", self._thread.name)
                self._fail_running(EngineFailure("The engine failed on the batch this request was in.",
                                                 detail=f"{type(exc).__name__}: {exc}"))
            finally:
                self._hand_over()

    def _hand_over(self) -> None:
        """Hands what this step emitted to the event loops: one call_soon_threadsafe each."""
        if not self._outbox:
            return
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, deltas, request, item in self._outbox:
            batches.setdefault(loop, []).append((deltas, request, item))
        self._outbox = []
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # its event loop is closed: nobody is left to answer
                for _, request, _ in batch:
                    request.cancelled = True

    def _died(self, exc: BaseException) -> None:
        log.error("%s stopped: %s: %s", self._thread.name, type(exc).__name__, exc, exc_info=exc)
        self.failure = f"its engine loop stopped ({type(exc).__name__}: {exc})"
        error = EngineFailure("The engine stopped.", detail=f"{type(exc).__name__}: {exc}")
        try:
            self._fail_running(error)
        except Exception:  # noqa: BLE001 - the batch state may be what broke; answer the rest
            log.exception("%s: ending its running requests failed", self._thread.name)
        self._answer_pending(error)

    def _take_pending(self, block: bool) -> None:
        try:
            item = self._pending.get(block=block)
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._pending.get_nowait()
        except queue.Empty:
            pass


def _deliver(batch) -> None:
    for deltas, request, item in batch:
        try:
            deltas.put_nowait(item)
        except Exception:  # noqa: BLE001 - this request is lost to its reader; the rest still get theirs
            log.exception("a delta could not be handed to its request; the request is cancelled")
            request.cancelled = True


class EngineThread:
    """One dedicated thread per model for engines whose objects are not thread-safe.

    Every call into the engine goes through this thread, one at a time, so the event
    loop never blocks and two requests never touch the engine at once.
    """

    def __init__(self, name: str):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def call(self, fn: Callable, *args):
        try:
            work = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except RuntimeError as exc:  # "cannot schedule new futures after shutdown": the model went
            raise Unloaded("The model was unloaded before this request started.") from exc
        return await work

    def shutdown(self):
        self._executor.shutdown(wait=True)
