"""A generation's time limits, counted from the moment its engine admits it.

limits.request_timeout bounds the whole generation from when the engine takes the request into
its batch (backends.base.ADMITTED, or the first token for engines that cannot tell), so a request
that waits its turn in the queue under ordinary load is not counted; limits.stall_timeout bounds
the gap between two tokens from the first token on. The prefill before it is work the client
cannot see (eight 1,000-token prompts admitted together on 2 busy cores took over 120 s to reach
the last one's first token), bounded by request_timeout alone, as vLLM bounds none of it. The
wait in the queue is bounded by request_timeout too, and running past it answers 503 (busy, try
again), not 504.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from ..errors import APIError

QUEUE, REQUEST, STALL = "queue", "request", "stall"


class Deadline:
    """The limits of one request's generations (n choices share it); ``watch()`` is one of them."""

    def __init__(self, total: float, stall: float):
        self.loop = asyncio.get_running_loop()
        self.total, self.stall = total, stall
        self.why: Optional[str] = None  # which limit a watch ran past

    def watch(self) -> "_Watch":
        """``async with deadline.watch() as w:`` around a generation: ``w.admitted()`` when the
        engine admits it, ``w.tick()`` at each token; TimeoutError when a limit passes. A stream
        that yields inside it marks the yield (``w.at_yield`` / ``w.resume()``): a limit that
        passes while its client holds it is raised when the stream resumes, inside the stream,
        so the client still gets the error event and ``[DONE]``."""
        return _Watch(self)

    def error(self) -> APIError:
        if self.why == QUEUE:
            return APIError(f"The request waited {self.total:g} s for the engine to start it "
                            "(limits.request_timeout) and was not started: the model is busy; retry later.",
                            status=503, type="server_error", code="queue_timeout", headers={"Retry-After": "1"})
        if self.why == STALL:
            why = f"no token came for {self.stall:g} s (limits.stall_timeout)"
        else:
            why = f"it ran longer than {self.total:g} s after the engine started it (limits.request_timeout)"
        return APIError(f"The generation was stopped: {why}.", status=504, type="server_error", code="timeout")


class _Watch:
    """A Deadline over one generation: one timer handle, moved at admission and checked at each
    stall limit; a token costs one clock read (re-arming a timer at every token re-queued a
    handle each time). When a limit passes, the await on the engine is cancelled through an
    asyncio timeout, unless the stream is suspended at a yield: then ``resume()`` raises it."""

    __slots__ = ("deadline", "time", "last", "end", "started", "producing", "timeout", "timer", "check", "at_yield",
                 "due")

    def __init__(self, deadline: Deadline):
        self.deadline, self.time = deadline, deadline.loop.time
        self.started = self.producing = self.at_yield = self.due = False

    async def __aenter__(self) -> "_Watch":
        self.timeout = asyncio.timeout(None)
        self.timer = await self.timeout.__aenter__()
        self.last = self.time()
        self.end = self.last + self.deadline.total  # the wait for admission
        self.check = self.deadline.loop.call_at(self.end, self._check)
        return self

    def admitted(self) -> None:
        if self.started:
            return
        self.started = True
        self.last = now = self.time()
        self.end = now + self.deadline.total
        self.check.cancel()
        self.check = self.deadline.loop.call_at(self.end, self._check)  # the prefill: request_timeout only

    def tick(self) -> None:
        self.last = self.time()
        if not self.producing:  # the first token: the stall limit counts from here
            self.producing = True
            if not self.started:  # engines that do not say when they admit: the first token does
                self.admitted()
            self.check.cancel()
            self.check = self.deadline.loop.call_at(min(self.end, self.last + self.deadline.stall), self._check)

    def yielding(self) -> None:
        """Before a yield: raises a limit that passed (or is about to cancel the stream's await)."""
        if self.due:
            raise TimeoutError
        self.at_yield = True

    def resume(self) -> None:
        """After a yield: raises the limit that passed while the client held the stream."""
        self.at_yield = False
        if self.due:
            raise TimeoutError

    def _check(self) -> None:
        now = self.time()
        if not self.started:
            why = QUEUE
        elif now >= self.end - 0.001:
            why = REQUEST
        elif self.producing and now >= self.last + self.deadline.stall - 0.001:
            why = STALL
        else:
            due = min(self.end, self.last + self.deadline.stall) if self.producing else self.end
            self.check = self.deadline.loop.call_at(due, self._check)
            return
        self.deadline.why = why
        # due in either case: a cancel queued here may come after the engine's next delta, and the
        # stream must not yield past it (yielding() raises first, which also drops the cancel)
        self.due = True
        if not self.at_yield:
            self.timer.reschedule(now)  # cancels the await on the engine: TimeoutError

    async def __aexit__(self, *exc) -> Optional[bool]:
        self.check.cancel()
        return await self.timeout.__aexit__(*exc)
