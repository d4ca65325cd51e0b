"""The lifecycle of a generation, shared by chat and text completions: the model held in use,
n choices (for each prompt) run together, their deadlines, the whole answer or the stream of
chunks (serving/chunks.py writes them), and what is released when it ends or its client leaves.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Optional, Union

from backends.base import ADMITTED, Delta, TokenLogprob
from backends.text import with_stops

from ..errors import InvalidRequest, engine_failed
from ..metrics import RequestMetrics
from .base import Serving
from .chunks import Shape, json_text, sse_event, usage
from .deadline import Deadline

log = logging.getLogger("llmserve")

Result = Union[dict[str, Any], AsyncIterator[str]]


@dataclass
class Prompt:
    """One prompt of a request, as token ids, and its text where the answer echoes it."""

    ids: list[int]
    text: str = ""


class GenerationServing(Serving):
    async def _generate(self, alias: str, capability: str, req, encode, shape: Shape, prompt_field: str,
                        calls=None) -> Result:
        """Runs ``req.n`` choices of every prompt ``encode(backend)`` gives, as one answer or
        (req.stream) as Server-Sent Events ending with ``data: [DONE]``."""
        # the manager's context is entered by hand: for a stream it stays open until the
        # last chunk is sent, long after this function has returned
        use = self.manager.use(alias, capability, sequences=req.sequences())
        backend = await use.__aenter__()
        try:
            prompts: list[Prompt] = await encode(backend)
            shape.set_prompts([p.text for p in prompts], req.n)
            for p in prompts:
                if not p.ids:  # e.g. "" for a model that adds no BOS: nothing to continue from
                    raise InvalidRequest("The prompt is empty: give at least one token of text.",
                                         param=prompt_field, code="empty_prompt")
            params = [self._sampling(req, len(p.ids), backend, calls, prompt_field) for p in prompts]
            for pp in params:  # an adapter's name: its base's engine runs the request with the adapter
                pp.adapter = self.manager.adapter_of(alias)
            await backend.prepare(params[0])  # a constraint the engine cannot serve: refused before any byte
            # n choices are n generations of the same prompt (seeded ones with seed, seed+1, ...)
            choices = [(p, pp if i == 0 else replace(pp, seed=None if pp.seed is None else pp.seed + i))
                       for p, pp in zip(prompts, params) for i in range(req.n)]
            for _, pp in choices[1:]:
                pp.compiled = params[0].compiled  # the constraint is the request's, compiled once
            streams = [with_stops(backend.generate(p.ids, pp), pp.stop) for p, pp in choices]
        except BaseException as exc:
            await use.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        # each prompt's tokens are counted once, on its first choice
        metrics = [RequestMetrics(alias, len(p.ids) if k % req.n == 0 else 0) for k, (p, _) in enumerate(choices)]
        prompt_tokens = sum(len(p.ids) for p in prompts)
        deadline = Deadline(self.settings.limits.request_timeout, self.settings.limits.stall_timeout)
        chat = shape.chat
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": alias,
            "object": "chat.completion" if chat else "text_completion",
        }
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            release = Release(use, streams, metrics)
            meta["object"] = "chat.completion.chunk" if chat else "text_completion"
            if len(streams) == 1 and shape.plain():
                chunks = self._stream(release, backend, streams[0], meta, prompt_tokens, metrics[0], shape,
                                      include_usage, deadline)
            else:
                chunks = self._stream_choices(release, backend, streams, meta, prompt_tokens, metrics, shape,
                                              include_usage, deadline, req.n)
            return EventStream(chunks, release, prompt_tokens)
        try:
            # a TaskGroup, not gather: when one choice fails (or the caller is cancelled: its
            # client left) the other choices are cancelled too, which stops their engine work
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._collect(backend, d, m, deadline))
                         for d, m in zip(streams, metrics)]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        finally:
            for m in metrics:
                m.finish("aborted")  # a no-op for the choices that ended
            await use.__aexit__(None, None, None)
        results = [t.result() for t in tasks]
        completion = 0 if not shape.output else sum(r.last.completion_tokens for r in results)
        return {**meta, "choices": [shape.choice(i, r.text, r.last.finish_reason or "stop", r.logprobs,
                                                 r.prompt_logprobs, r.last.stop_sequence)
                                    for i, r in enumerate(results)],
                "usage": usage(prompt_tokens, completion, _cached(metrics, req.n))}

    async def _collect(self, backend, deltas, metrics, deadline) -> "Collected":
        got = Collected()
        status = "aborted"  # cancelled: the client left, or another choice failed
        try:
            await _read(deltas, deadline, metrics, got.add)
            status = got.last.finish_reason or "stop"
        except Exception as exc:
            status = "error"
            raise engine_failed(exc, backend.name) from exc
        finally:
            metrics.finish(status)
            await deltas.aclose()
        return got

    async def _stream(self, release, backend, deltas, meta, prompt_tokens, metrics, shape, include_usage,
                      deadline):
        """The stream of one plain choice: the same chunks as _stream_choices writes, with each
        token's bytes made from one template (the per-chunk path is the front end's budget)."""
        head, tail = shape.token_template(meta)
        status = "aborted"
        try:
            first = shape.first_chunk(0)
            if first is not None:
                yield sse_event({**meta, "choices": [first]})
            completion_tokens = 0
            try:
                async with deadline.watch() as watch:
                    async for d in deltas:
                        if d is ADMITTED:
                            watch.admitted()
                            continue
                        watch.tick()
                        metrics.on_delta(d)
                        completion_tokens = d.completion_tokens
                        if d.text:
                            watch.yielding()
                            yield head + json_text(d.text) + tail
                            watch.resume()
                        if d.finish_reason:  # in a chunk of its own, with no text, as OpenAI sends it
                            status = d.finish_reason
                            watch.yielding()
                            yield sse_event({**meta, "choices": [shape.finish_chunk(0, d.finish_reason,
                                                                                    d.stop_sequence)]})
                            watch.resume()
            except TimeoutError:
                raise deadline.error() from None
            if include_usage:
                yield sse_event({**meta, "choices": [], "usage": usage(prompt_tokens, completion_tokens, metrics.cached)})
        except Exception as exc:
            status = "error"
            yield sse_event(engine_failed(exc, backend.name).body())
        finally:
            # runs too when the client goes away: closing `deltas` stops the engine's work
            metrics.finish(status)
            await release()
        yield "data: [DONE]\n\n"

    async def _stream_choices(self, release, backend, streams, meta, prompt_tokens, metrics, shape, include_usage,
                              deadline, n: int):
        """The general stream: choices interleaved by index, logprobs per chunk, echo, and
        tool calls (content as it comes, then each call's id and name, then its arguments).
        Each choice is read by a pump task of its own, which never waits on the client."""
        events: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                await _read(streams[i], deadline, metrics[i], lambda d: events.put_nowait((i, d)))
            except Exception as exc:  # noqa: BLE001 - handed to the client's stream below
                events.put_nowait((i, exc))
            finally:  # cancelled too (the client left): the release below waits for this
                events.put_nowait((i, None))

        release.tasks = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
        parsers = [shape.parser() for _ in streams]
        counts, open_ = [0] * len(streams), len(streams)
        try:
            for i in range(len(streams)):
                first = shape.first_chunk(i)
                if first is not None:
                    yield sse_event({**meta, "choices": [first]})
            while open_:
                i, d = await events.get()
                if d is None:
                    open_ -= 1
                    continue
                if isinstance(d, BaseException):
                    metrics[i].finish("error")
                    err = engine_failed(d, backend.name)
                    yield sse_event(err.body())
                    continue
                counts[i] = d.completion_tokens if shape.output else 0
                if d.finish_reason:
                    metrics[i].finish(d.finish_reason)
                if parsers[i] is not None:
                    for c in shape.call_chunks(i, d, parsers[i]):
                        yield sse_event({**meta, "choices": [c]})
                    continue
                for c in shape.chunks(i, d):
                    yield sse_event({**meta, "choices": [c]})
            if include_usage:
                yield sse_event({**meta, "choices": [], "usage": usage(prompt_tokens, sum(counts), _cached(metrics, n))})
        finally:
            await release()
        yield "data: [DONE]\n\n"


def _cached(metrics: list[RequestMetrics], n: int) -> int:
    """Cached prompt tokens of an answer: each prompt's once, on its first choice (as its tokens count)."""
    return sum(m.cached for k, m in enumerate(metrics) if k % n == 0)


async def _read(deltas, deadline: Deadline, metrics: RequestMetrics, each) -> None:
    """Hands every delta of one generation to ``each`` under its deadline (a whole answer's
    choices and a general stream's pumps, which never yield to the client while they read; the
    plain stream does, and reads inline). A limit that passes raises the deadline's APIError."""
    try:
        async with deadline.watch() as watch:
            async for d in deltas:
                if d is ADMITTED:
                    watch.admitted()
                    continue
                watch.tick()
                metrics.on_delta(d)
                each(d)
    except TimeoutError:
        raise deadline.error() from None


class Collected:
    """One choice of a whole answer, as its deltas add up."""

    def __init__(self):
        self.pieces: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: Optional[list] = None
        self.last = Delta("", 0, "stop")

    def add(self, d: Delta) -> None:
        self.pieces.append(d.text)
        self.logprobs.extend(d.logprobs or ())
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs
        self.last = d

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class Release:
    """What a streamed answer holds until it ends: the model's in-use count, each choice's
    running gauge, the engine's work. Called when the stream ends, and again by the HTTP
    response (a no-op then) so that a client gone before the first chunk frees it too.

    The work runs in a task of its own, shielded: when a client leaves, Starlette cancels the
    response (anyio repeats the cancellation at every await), and a release cut short at its
    first await would leave the gauges and the in-use count raised for good."""

    def __init__(self, use, streams, metrics):
        self.use, self.streams, self.metrics = use, streams, metrics
        self.tasks: list[asyncio.Task] = []  # the pumps of _stream_choices, cancelled first
        self._done: Optional[asyncio.Future] = None

    async def __call__(self) -> None:
        if self._done is None:
            self._done = asyncio.ensure_future(self._release())
        await asyncio.shield(self._done)

    async def _release(self) -> None:
        for m in self.metrics:
            m.finish("aborted")  # a no-op for a choice that ended
        try:
            for task in self.tasks:
                task.cancel()
            # a pump leaves its generator before that generator is closed (closing one that is
            # still running raises RuntimeError and leaves the engine's work going)
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for stream in self.streams:
                try:
                    await stream.aclose()
                except Exception:  # noqa: BLE001 - an engine that fails while stopping: logged only
                    log.exception("stopping a generation failed")
        finally:
            await self.use.__aexit__(None, None, None)


class EventStream:
    """The SSE events of a streamed answer, with ``aclose`` releasing what it holds even when
    the events were never asked for (a generator that never started never runs its finally)."""

    def __init__(self, events: AsyncIterator[str], release: Release, prompt_tokens: int = 0):
        self.events, self.release = events, release
        self.prompt_tokens = prompt_tokens  # known before the first event (Anthropic's message_start says it)

    def __aiter__(self) -> AsyncIterator[str]:
        return self.events

    async def __anext__(self) -> str:
        return await self.events.__anext__()

    async def aclose(self) -> None:
        try:
            await self.events.aclose()
        finally:
            await self.release()
