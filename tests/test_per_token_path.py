"""The per-token path (issue 25) keeps its answers: the stall watchdog times out on a gap, not
on a long generation; per-bucket histogram writes count what observe() counts; a step's deltas
and errors reach their request in order, once per event loop; orjson writes the chunk text
json.dumps writes; /metrics answers with BentoML's HTTP metrics and access log off."""

from __future__ import annotations

import asyncio
import bisect
import gc
import json
import threading
import time

import httpx
import pytest

from conftest import start_server

BOUND = 30  # seconds: what a busy 2-core machine needs at most for these small steps


# -- the stall watchdog (serving.deadline.Deadline.watch) ------------------------------------------

async def _tokens(n: int, gap: float, then_stall: bool = False):
    for i in range(n):
        await asyncio.sleep(gap)
        yield i
    if then_stall:
        await asyncio.sleep(3600)


async def test_a_generation_longer_than_stall_timeout_with_short_gaps_completes():
    from llmserve.serving.deadline import Deadline

    deadline, got = Deadline(total=BOUND, stall=1.0), []
    start = time.monotonic()
    async with deadline.watch() as watch:
        async for token in _tokens(15, 0.1):  # 1.5 s in all, no gap near 1 s
            watch.tick()
            got.append(token)
    assert got == list(range(15)) and time.monotonic() - start > deadline.stall


async def test_a_stall_after_some_tokens_times_out_with_a_504_naming_stall_timeout():
    from llmserve.errors import APIError
    from llmserve.serving.deadline import Deadline

    deadline, got = Deadline(total=BOUND, stall=0.3), []
    with pytest.raises(TimeoutError):
        async with deadline.watch() as watch:
            async for token in _tokens(3, 0.05, then_stall=True):
                watch.tick()
                got.append(token)
    error = deadline.error()
    assert got == [0, 1, 2]
    assert isinstance(error, APIError) and error.status == 504 and "limits.stall_timeout" in error.message


async def test_past_request_timeout_the_504_names_request_timeout_even_while_tokens_come():
    from llmserve.serving.deadline import Deadline

    deadline = Deadline(total=0.5, stall=BOUND)
    with pytest.raises(TimeoutError):
        async with deadline.watch() as watch:
            async for _ in _tokens(1000, 0.02):
                watch.tick()
    assert deadline.error().status == 504 and "limits.request_timeout" in deadline.error().message


async def test_time_in_the_queue_is_not_a_stall_the_limits_count_from_admission():
    from backends.base import ADMITTED

    from llmserve.serving.deadline import Deadline

    async def queued_then_tokens():
        await asyncio.sleep(0.6)  # waits for a place in the batch, twice the stall limit
        yield ADMITTED
        for i in range(5):
            await asyncio.sleep(0.05)
            yield i

    deadline, got = Deadline(total=BOUND, stall=0.3), []
    async with deadline.watch() as watch:
        async for item in queued_then_tokens():
            if item is ADMITTED:
                watch.admitted()
                continue
            watch.tick()
            got.append(item)
    assert got == list(range(5))


async def test_a_long_prefill_after_admission_is_not_a_stall_only_gaps_between_tokens_are():
    """Admitted, then three times the stall limit before the first token (a long prompt behind
    others' prefills): the generation goes on; request_timeout still bounds that wait."""
    from backends.base import ADMITTED

    from llmserve.serving.deadline import Deadline

    async def admitted_then_slow_prefill():
        yield ADMITTED
        await asyncio.sleep(0.9)
        for i in range(5):
            await asyncio.sleep(0.05)
            yield i

    deadline, got = Deadline(total=BOUND, stall=0.3), []
    async with deadline.watch() as watch:
        async for item in admitted_then_slow_prefill():
            if item is ADMITTED:
                watch.admitted()
                continue
            watch.tick()
            got.append(item)
    assert got == list(range(5))

    deadline = Deadline(total=0.4, stall=0.1)  # a prefill past request_timeout still ends it
    with pytest.raises(TimeoutError):
        async with deadline.watch() as watch:
            watch.admitted()
            await asyncio.sleep(3600)
    assert deadline.error().status == 504 and "limits.request_timeout" in deadline.error().message


async def test_a_request_never_admitted_within_request_timeout_is_a_503_saying_it_waited():
    from llmserve.serving.deadline import Deadline

    deadline = Deadline(total=0.3, stall=0.1)
    with pytest.raises(TimeoutError):
        async with deadline.watch():
            await asyncio.sleep(3600)  # never admitted, no token
    error = deadline.error()
    assert error.status == 503 and error.code == "queue_timeout" and "waited" in error.message
    assert error.headers == {"Retry-After": "1"}


async def test_a_limit_that_passes_while_the_client_holds_the_stream_still_ends_it_with_an_error_and_done():
    """The plain stream yields inside its deadline: a stall limit that passes while the client is
    slow to read must end the stream with the error event and [DONE], not cut it off."""
    from backends.base import Delta

    from llmserve.metrics import RequestMetrics
    from llmserve.serving.chunks import Shape
    from llmserve.serving.deadline import Deadline
    from llmserve.serving.generation import GenerationServing, Release

    async def deltas():
        yield Delta("a", 1)
        yield Delta("b", 2)
        await asyncio.sleep(3600)

    class Use:
        async def __aexit__(self, *exc):
            return None

    class Engine:
        name = "scripted"

    gen, metrics = deltas(), RequestMetrics("test-held-stream", 0)
    meta = {"id": "chatcmpl-x", "created": 0, "model": "m", "object": "chat.completion.chunk"}
    stream = GenerationServing(None, None)._stream(
        Release(Use(), [gen], [metrics]), Engine(), gen, meta, 1, metrics, Shape(chat=True, calls=None, logprobs=False),
        False, Deadline(total=BOUND, stall=0.3))
    events = []
    async with asyncio.timeout(BOUND):
        async for event in stream:
            events.append(event)
            if len(events) == 2:  # the role chunk and "a": the client holds the stream past the stall limit
                await asyncio.sleep(0.6)
    assert events[-1] == "data: [DONE]\n\n"
    assert '"code": "timeout"' in events[-2] and "limits.stall_timeout" in events[-2]


# -- per-bucket histogram writes (metrics._observe_many) -------------------------------------

def test_observe_many_writes_what_the_same_observe_calls_write():
    import prometheus_client as prom

    from llmserve.metrics import _ITL_BOUNDS, _LATENCY_BUCKETS, _observe_many

    values = [0.001, 0.005, 0.0051, 0.03, 0.03, 0.7, 9.0, 40.0, 41.0, 120.0]  # edges and past +Inf
    out = []
    for batched in (False, True):
        registry = prom.CollectorRegistry()
        h = prom.Histogram("itl", "d", labelnames=["model"], buckets=_LATENCY_BUCKETS, registry=registry)
        child = h.labels(model="m")
        if batched:
            counts = [0] * len(_ITL_BOUNDS)
            for v in values:
                counts[bisect.bisect_left(_ITL_BOUNDS, v)] += 1
            _observe_many(child, counts, sum(values))
        else:
            for v in values:
                child.observe(v)
        text = prom.generate_latest(registry).decode()
        out.append("\n".join(line for line in text.splitlines() if "_created" not in line))  # a timestamp
    assert out[0] == out[1]
    assert 'itl_bucket{le="+Inf",model="m"} 10.0' in out[1] and 'itl_bucket{le="40.0",model="m"} 8.0' in out[1]


# -- the StepLoop outbox ---------------------------------------------------------------------

def _scripted_loop(script, go: threading.Event, hold: threading.Event | None = None):
    """A StepLoop with no engine: once ``go`` is set, each step emits ``script`` (a list of
    Deltas and errors) to every admitted request and lets it go; a step waits for ``hold``
    (when given) first."""
    from backends.scheduling import StepLoop

    class Scripted(StepLoop):
        def __init__(self):
            super().__init__("scripted-loop")
            self.rows, self.admitted = [], []
            self._thread.start()

        def running(self):
            return len(self.rows)

        def _drop_cancelled(self):
            self.rows = [r for r in self.rows if not r.cancelled]

        def _admit(self):
            self.rows += self._waiting
            self.admitted += self._waiting
            self._waiting = []

        def _step(self):
            if hold is not None:
                hold.wait(BOUND)
            if not go.wait(0.01):
                return
            for request in self.rows:
                for item in script:
                    request.emit(item)
            self.rows = []

        def _fail_running(self, error):
            for request in self.rows:
                request.emit(error)
            self.rows = []

    return Scripted()


async def test_deltas_then_an_error_emitted_in_one_step_arrive_in_order():
    from backends.base import Delta, SamplingParams
    from backends.errors import EngineFailure

    go = threading.Event()
    go.set()
    loop = _scripted_loop([Delta("a", 1), Delta("b", 2), EngineFailure("the step failed after two tokens")], go)
    try:
        got = []
        with pytest.raises(EngineFailure, match="after two tokens"):
            async with asyncio.timeout(BOUND):
                async for d in loop.stream([1], SamplingParams(max_tokens=4)):
                    got.append(d.text)
        assert got == ["a", "b"]
    finally:
        await asyncio.to_thread(loop.close)


async def test_a_cancelled_request_is_not_counted_again_as_queued():
    """A client that leaves wakes the loop with a marker on the request queue; the engine's
    count (GET /models running_requests) counts requests, not markers."""
    from backends.base import SamplingParams

    go, hold = threading.Event(), threading.Event()
    loop = _scripted_loop([], go, hold)
    try:
        stream = loop.stream([1], SamplingParams(max_tokens=4))
        reader = asyncio.ensure_future(stream.__anext__())
        async with asyncio.timeout(BOUND):
            while not loop.admitted:  # admitted; its step now waits for `hold`
                await asyncio.sleep(0.01)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await stream.aclose()  # the client left: cancelled, and the loop woken
        assert loop.admitted[0].cancelled
        assert (loop.queued(), loop.busy()) == (0, 1)  # the row until the next step drops it
        hold.set()
        async with asyncio.timeout(BOUND):
            while loop.busy():
                await asyncio.sleep(0.01)
    finally:
        hold.set()
        await asyncio.to_thread(loop.close)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the reader dies with its loop
def test_a_request_whose_event_loop_closed_is_marked_cancelled():
    assert _cancelled_when_its_event_loop_closed()
    gc.collect()  # the reader, stuck on its closed loop, goes here and not in a later test


def _cancelled_when_its_event_loop_closed() -> bool:
    from backends.base import Delta, SamplingParams

    go = threading.Event()
    loop = _scripted_loop([Delta("a", 1)], go)
    other = asyncio.new_event_loop()
    try:
        stream = loop.stream([1], SamplingParams(max_tokens=4))

        async def start():
            pending = asyncio.ensure_future(stream.__anext__())
            async with asyncio.timeout(BOUND):
                while not loop.admitted:
                    await asyncio.sleep(0.01)
            return pending

        other.run_until_complete(start())._log_destroy_pending = False
        other.close()  # its reader is gone with it: the step's hand-over cannot reach it
        go.set()
        request = loop.admitted[0]
        deadline = time.monotonic() + BOUND
        while not request.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        return request.cancelled
    finally:
        loop.close()


# -- orjson for the chunk text ---------------------------------------------------------------

@pytest.mark.parametrize("text", ["plain", 'q"b\\s/', "\x00\x01\x1f\x7f", "\n\t\r", "\u2028\u2029",
                                  "é 中 😀", "\ud800", "a\udfffb"])
def test_chunk_text_is_what_json_dumps_writes_including_lone_surrogates(text):
    from llmserve.serving.chunks import json_text as _json_text

    assert _json_text(text) == json.dumps(text, ensure_ascii=False)


# -- /metrics with BentoML's HTTP metrics and access log off ---------------------------------

def test_with_http_metrics_and_access_log_off_metrics_still_serves_the_llm_metrics():
    server = start_server({"LLMSERVE_SERVICE__HTTP_METRICS": "false", "LLMSERVE_SERVICE__ACCESS_LOG": "false",
                           "LLMSERVE_MODELS__MINILM__PRELOAD": "false"}, name="test-server-lean")
    try:
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        metrics = httpx.get(f"{server.url}/metrics", timeout=10)
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert server.metric("llm_requests_total", model="smollm2") == 1
        assert "request_duration_seconds" not in metrics.text  # BentoML's HTTP metrics are off
        assert "path=/v1/chat/completions" not in server.log_path.read_text()  # and its access log
    finally:
        server.stop()
