"""The OpenAI-compatible operations, shared by the HTTP routes and the BentoML APIs.

chat / complete / embed take a validated request and return either one response
dict or (stream=True) an async iterator of chunk dicts. Everything a client can get
wrong is raised as an APIError (4xx) before the first byte is sent.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Optional, Union

import orjson
from backends.base import CHAT, COMPLETION, EMBEDDINGS, Backend, Delta, SamplingParams, TokenLogprob
from backends.text import with_stops
from . import tools
from .config import Settings
from .errors import APIError, InvalidRequest, internal_error, to_api_error
from .manager import ModelManager
from .metrics import RequestMetrics
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

log = logging.getLogger("llmserve")

Result = Union[dict[str, Any], AsyncIterator[dict[str, Any]]]


class OpenAIOperations:
    def __init__(self, manager: ModelManager, settings: Settings):
        self.manager = manager
        self.settings = settings

    # -- public operations ----------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest) -> Result:
        alias = req.model or self.settings.default_model
        for name in ("functions", "function_call", "audio", "prediction", "web_search_options"):
            if getattr(req, name) is not None:
                raise InvalidRequest(f"`{name}` is not supported by this server" + _HINTS.get(name, "."), param=name,
                                     code="unsupported_parameter")
        if req.modalities not in (None, ["text"]):
            raise InvalidRequest("Only text output is supported (`modalities: [\"text\"]`).", param="modalities",
                                 code="unsupported_parameter")
        calls = tools.ChatTools(req, self.settings.models.get(alias))
        self._check_prompt_size(sum(len(m.text()) for m in req.messages))
        return await self._run(alias, CHAT, req, calls.encode, calls)

    async def complete(self, req: CompletionRequest) -> Result:
        alias = req.model or self.settings.default_model
        if req.suffix is not None:
            raise InvalidRequest("`suffix` (fill-in-the-middle) is not supported by this server.", param="suffix",
                                 code="unsupported_parameter")
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidRequest("`best_of` is not supported by this server; ask for `n` choices instead.",
                                 param="best_of", code="unsupported_parameter")
        if req.echo and req.logprobs is not None:
            raise InvalidRequest("`echo` with `logprobs` (the prompt's logprobs) is not supported by this server.",
                                 param="echo", code="unsupported_parameter")
        self._check_prompt_size(len(req.prompt))
        return await self._run(alias, COMPLETION, req, lambda b: b.encode_text(req.prompt))

    async def embed(self, req: EmbeddingRequest) -> dict[str, Any]:
        alias = req.model or self.settings.embedding_model or self.settings.default_model
        limits = self.settings.limits
        if len(req.input) > limits.max_embedding_inputs:
            raise InvalidRequest(
                f"{len(req.input)} inputs given; at most {limits.max_embedding_inputs} per request.", param="input"
            )
        self._check_prompt_size(sum(len(s) for s in req.input))
        async with self.manager.use(alias, EMBEDDINGS) as backend:
            texts = await self._embedding_texts(req, backend) if req.token_ids() else req.input
            try:
                result = await backend.embed(texts)
            except Exception as exc:
                raise (to_api_error(exc) or internal_error(exc, f"The {backend.name} engine failed.")) from exc
        size = len(result.vectors[0]) if result.vectors else None
        if req.dimensions is not None and req.dimensions != size:
            raise InvalidRequest(f"`dimensions` is {req.dimensions}, but model {alias!r} makes embeddings of {size} "
                                 "dimensions and cannot shorten them; leave `dimensions` out or give its own size.",
                                 param="dimensions", code="unsupported_value")
        data = []
        for i, vec in enumerate(result.vectors):
            emb: Any = vec
            if req.encoding_format == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {
            "object": "list",
            "data": data,
            "model": alias,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }

    @staticmethod
    async def _embedding_texts(req: EmbeddingRequest, backend: Backend) -> list[str]:
        """Token-id input, as OpenAI takes it, turned back into text by the model's tokenizer
        (engines embed text). An engine without a ``decode`` cannot take ids."""
        decode = getattr(backend, "decode", None)
        if decode is None:
            raise InvalidRequest(f"Token-id input is not supported by the {backend.name} engine that serves this "
                                 "model; send the text instead.", param="input", code="unsupported_value")
        vocab = backend.vocab_size()
        if vocab is not None and any(t >= vocab for ids in req.input for t in ids):
            raise InvalidRequest(f"input holds a token id outside this model's vocabulary (0..{vocab - 1}).",
                                 param="input", code="invalid_value")
        return [await decode(ids) for ids in req.input]

    # -- model admin -------------------------------------------------------------------------
    def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": self.manager.list_models()}

    async def load_model(self, name: str) -> dict[str, Any]:
        return {"id": name, "loaded": True, **(await self.manager.load(name))}

    async def unload_model(self, name: str) -> dict[str, Any]:
        return {"id": name, "loaded": False, "was_loaded": await self.manager.unload(name)}

    # -- the shared path of chat and completion ----------------------------------------------
    def _check_prompt_size(self, chars: int) -> None:
        limit = self.settings.limits.max_prompt_chars
        if chars > limit:
            raise InvalidRequest(
                f"The prompt has {chars} characters, more than this server's limit of {limit} "
                "(limits.max_prompt_chars).",
                code="context_length_exceeded",
            )

    def _sampling(self, req, prompt_tokens: int, backend: Backend, calls=None) -> SamplingParams:
        limits = self.settings.limits
        ctx = backend.context_length()
        asked = req.requested_max_tokens()
        if asked is not None and asked > limits.max_tokens:
            raise InvalidRequest(
                f"max_tokens is {asked}, more than this server allows ({limits.max_tokens}, limits.max_tokens).",
                param="max_tokens",
                code="invalid_value",
            )
        if prompt_tokens >= ctx or (asked is not None and prompt_tokens + asked > ctx):
            raise InvalidRequest(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{prompt_tokens + (asked or 0)} tokens ({prompt_tokens} in the prompt, {asked or 0} for the "
                "completion). Please reduce the length of the prompt or max_tokens.",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        max_tokens = asked if asked is not None else min(limits.default_max_tokens, ctx - prompt_tokens)
        bias = {int(t): b for t, b in (req.logit_bias or {}).items()}
        vocab = backend.vocab_size()
        if vocab is not None and any(not 0 <= t < vocab for t in bias):
            raise InvalidRequest(f"logit_bias names a token id outside this model's vocabulary (0..{vocab - 1}).",
                                 param="logit_bias", code="invalid_value")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            # a top_k of the whole vocabulary or more is no limit (engines index with it)
            top_k=req.top_k if req.top_k and 0 < req.top_k < (vocab or 2**31) else None,
            stop=req.stop_list(),
            seed=req.seed,
            ignore_eos=req.ignore_eos,
            logprobs=req.logprobs_k(),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            min_p=req.min_p,
            logit_bias=bias,
        )
        if calls is not None:  # tool_choice "required" / named: calls in the model's format; else response_format
            params.tool_grammar = calls.grammar()
            params.json_schema = None if params.tool_grammar else response_schema(req.response_format)
        for name in sorted(params.features() - backend.features):
            raise InvalidRequest(f"`{name}` is not supported by the {backend.name} engine that serves this model.",
                                 param=name, code="unsupported_parameter")
        return params

    async def _run(self, alias: str, capability: str, req, encode, calls=None) -> Result:
        chat = capability == CHAT
        # the manager's context is entered by hand: for a stream it stays open until the
        # last chunk is sent, long after this function has returned
        use = self.manager.use(alias, capability)
        backend = await use.__aenter__()
        try:
            prompt_ids = await encode(backend)
            if not prompt_ids:  # e.g. "" for a model that adds no BOS: nothing to continue from
                raise InvalidRequest("The prompt is empty: give at least one token of text.",
                                     param="messages" if chat else "prompt", code="empty_prompt")
            params = self._sampling(req, len(prompt_ids), backend, calls)
            await backend.prepare(params)  # a constraint the engine cannot serve: refused before any byte
            # n choices are n generations of the same prompt (seeded ones with seed, seed+1, ...)
            choices = [params if i == 0 else replace(params, seed=None if params.seed is None else params.seed + i)
                       for i in range(req.n)]
            streams = [with_stops(backend.generate(prompt_ids, p), p.stop) for p in choices]
        except BaseException as exc:
            await use.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        metrics = [RequestMetrics(alias, len(prompt_ids) if i == 0 else 0) for i in range(req.n)]
        deadline = Deadline(self.settings.limits.request_timeout, self.settings.limits.stall_timeout)
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": alias,
            "object": "chat.completion" if chat else "text_completion",
        }
        shape = Shape(chat, calls, params.logprobs is not None,
                      req.prompt if not chat and req.echo else "")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            release = Release(use, streams, metrics)
            if req.n == 1 and shape.plain():
                chunks = self._stream(release, backend, streams[0], meta, len(prompt_ids), metrics[0], chat,
                                      include_usage, deadline)
            else:
                chunks = self._stream_choices(release, backend, streams, meta, len(prompt_ids), metrics, shape,
                                              include_usage, deadline)
            return EventStream(chunks, release)
        try:
            # a TaskGroup, not gather: when one choice fails (or the caller is cancelled: its
            # client left) the other choices are cancelled too, which stops their engine work
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._collect(backend, d, m, alias, deadline))
                         for d, m in zip(streams, metrics)]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        finally:
            for m in metrics:
                m.finish("aborted")  # a no-op for the choices that ended
            await use.__aexit__(None, None, None)
        results = [t.result() for t in tasks]
        completion = sum(last.completion_tokens for _, last, _ in results)
        return {**meta, "choices": [shape.choice(i, text, last.finish_reason or "stop", logprobs)
                                    for i, (text, last, logprobs) in enumerate(results)],
                "usage": _usage(len(prompt_ids), completion)}

    async def _collect(self, backend, deltas, metrics, alias, deadline) -> tuple[str, Delta, list[TokenLogprob]]:
        text, logprobs, last = [], [], Delta("", 0, "stop")
        status = "aborted"  # cancelled: the client left, or another choice failed
        try:
            try:
                async with deadline.watch() as watch:
                    async for d in deltas:
                        watch.tick()
                        metrics.on_delta(d)
                        text.append(d.text)
                        logprobs.extend(d.logprobs or ())
                        last = d
            except TimeoutError:
                raise deadline.error() from None
            status = last.finish_reason or "stop"
        except Exception as exc:
            status = "error"
            raise (to_api_error(exc) or internal_error(exc, f"The {backend.name} engine failed.")) from exc
        finally:
            metrics.finish(status)
            await deltas.aclose()
        return "".join(text), last, logprobs

    async def _stream(self, release, backend, deltas, meta, prompt_tokens, metrics, chat, include_usage, deadline):
        """The stream of one plain choice as Server-Sent Events, ending with ``data: [DONE]``."""
        meta = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text=None, finish=None, role=False):
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if text:
                    delta["content"] = text
                c = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                c = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return {**meta, "choices": [c]}

        # the chunk of one token is the same bytes around its text: encoded once, so each
        # token costs one string's encoding (the per-chunk path is the front end's budget)
        head, _, tail = sse_event(chunk(_TEXT_SLOT)).partition(json.dumps(_TEXT_SLOT))
        status = "aborted"
        try:
            if chat:
                yield sse_event(chunk(role=True))
            completion_tokens = 0
            try:
                async with deadline.watch() as watch:
                    async for d in deltas:
                        watch.tick()
                        metrics.on_delta(d)
                        completion_tokens = d.completion_tokens
                        if d.text:
                            yield head + _json_text(d.text) + tail
                        if d.finish_reason:  # in a chunk of its own, with no text, as OpenAI sends it
                            status = d.finish_reason
                            yield sse_event(chunk(finish=d.finish_reason))
            except TimeoutError:
                raise deadline.error() from None
            if include_usage:
                yield sse_event({**meta, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        except Exception as exc:
            status = "error"
            yield sse_event((to_api_error(exc) or internal_error(exc, f"The {backend.name} engine failed.")).body())
        finally:
            # runs too when the client goes away: closing `deltas` stops the engine's work
            metrics.finish(status)
            await release()
        yield "data: [DONE]\n\n"

    async def _stream_choices(self, release, backend, streams, meta, prompt_tokens, metrics, shape, include_usage,
                              deadline):
        """The general stream: n choices interleaved by index, logprobs per chunk, echo, and
        tool calls (content as it comes, then each call's id and name, then its arguments)."""
        meta = {**meta, "object": "chat.completion.chunk" if shape.chat else "text_completion"}
        events: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async with deadline.watch() as watch:
                    async for d in streams[i]:
                        watch.tick()
                        metrics[i].on_delta(d)
                        events.put_nowait((i, d))
            except TimeoutError:
                events.put_nowait((i, deadline.error()))
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
                    err = to_api_error(d) or internal_error(d, f"The {backend.name} engine failed.")
                    yield sse_event(err.body())
                    continue
                counts[i] = d.completion_tokens
                if d.finish_reason:
                    metrics[i].finish(d.finish_reason)
                if parsers[i] is not None:
                    for c in shape.call_chunks(i, d, parsers[i]):
                        yield sse_event({**meta, "choices": [c]})
                    continue
                for c in shape.chunks(i, d):
                    yield sse_event({**meta, "choices": [c]})
            if include_usage:
                yield sse_event({**meta, "choices": [], "usage": _usage(prompt_tokens, sum(counts))})
        finally:
            await release()
        yield "data: [DONE]\n\n"


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

    def __init__(self, events: AsyncIterator[str], release: Release):
        self.events, self.release = events, release

    def __aiter__(self) -> AsyncIterator[str]:
        return self.events

    async def __anext__(self) -> str:
        return await self.events.__anext__()

    async def aclose(self) -> None:
        try:
            await self.events.aclose()
        finally:
            await self.release()


@dataclass
class Shape:
    """How the choices of one request are written: chat or text, tool calls, logprobs, echo."""

    chat: bool
    calls: Optional[tools.ChatTools]  # a chat request's tools: an answer may hold calls
    logprobs: bool
    echo: str = ""

    def plain(self) -> bool:
        return not (self.calls and self.calls.tools) and not self.logprobs and not self.echo

    def parser(self) -> Optional[tools.CallParser]:
        return self.calls.parser() if self.calls else None

    def choice(self, i: int, text: str, finish: str, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        c: dict[str, Any] = {"index": i, "finish_reason": finish, "logprobs": self._logprobs(logprobs)}
        if not self.chat:
            c["text"] = self.echo + text
            return c
        content, calls = self.calls.parse(text) if self.calls else (text, [])
        if calls:
            c["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
            if finish == "stop":
                c["finish_reason"] = "tool_calls"
        else:
            c["message"] = {"role": "assistant", "content": text}
        return c

    def first_chunk(self, i: int) -> Optional[dict[str, Any]]:
        if self.chat:
            return {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
        if self.echo:
            return {"index": i, "text": self.echo, "finish_reason": None, "logprobs": None}
        return None

    def chunks(self, i: int, d: Delta) -> list[dict[str, Any]]:
        """The chunks of one delta: its text (and logprobs), then, on the last, the finish
        reason in a chunk of its own with an empty delta (as OpenAI sends it)."""
        out = []
        if d.text or d.logprobs or not d.finish_reason:
            logprobs = self._logprobs(d.logprobs or [])
            if self.chat:
                out.append({"index": i, "delta": {"content": d.text} if d.text else {}, "finish_reason": None,
                            "logprobs": logprobs})
            else:
                out.append({"index": i, "text": d.text, "finish_reason": None, "logprobs": logprobs})
        if d.finish_reason:
            out.append(self.finish_chunk(i, d.finish_reason))
        return out

    def finish_chunk(self, i: int, finish: str) -> dict[str, Any]:
        if self.chat:
            return {"index": i, "delta": {}, "finish_reason": finish, "logprobs": None}
        return {"index": i, "text": "", "finish_reason": finish, "logprobs": None}

    def call_chunks(self, i: int, d: Delta, parser: tools.CallParser) -> list[dict[str, Any]]:
        """The chunks of one step of an answer that may call tools: content, a call's id and
        name, pieces of its arguments; the finish reason "tool_calls" once a call was made."""
        events = parser.feed(d.text) + (parser.finish() if d.finish_reason else [])
        out = [{"index": i, "delta": _call_delta(e), "finish_reason": None, "logprobs": None} for e in events]
        if self.logprobs and d.logprobs:
            if not out:
                out.append({"index": i, "delta": {}, "finish_reason": None, "logprobs": None})
            out[0]["logprobs"] = self._logprobs(d.logprobs)
        if d.finish_reason:
            finish = "tool_calls" if d.finish_reason == "stop" and parser.calls else d.finish_reason
            out.append(self.finish_chunk(i, finish))
        return out

    def _logprobs(self, entries: list[TokenLogprob]) -> Optional[dict[str, Any]]:
        if not self.logprobs:
            return None
        if self.chat:  # OpenAI's chat shape
            return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
                                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, b, lp in e.top]}
                                for e in entries]}
        offsets, at = [], len(self.echo)  # the completions (legacy) shape
        for e in entries:
            offsets.append(at)
            at += len(e.token)
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{t: lp for t, _, lp in e.top} for e in entries], "text_offset": offsets}


class Deadline:
    """A generation's time limits: in all (limits.request_timeout) and between two tokens
    (limits.stall_timeout). Running past one cancels the engine's work as a disconnect does."""

    def __init__(self, total: float, stall: float):
        self.loop = asyncio.get_running_loop()
        self.total, self.stall = total, stall
        self.end = self.loop.time() + total

    def watch(self) -> "_Watch":
        """``async with deadline.watch() as w:`` around a generation, ``w.tick()`` at each
        token: TimeoutError when either limit passes."""
        return _Watch(self)

    def error(self) -> APIError:
        if self.loop.time() >= self.end - 0.01:
            why = f"it ran longer than {self.total:g} s (limits.request_timeout)"
        else:
            why = f"no token came for {self.stall:g} s (limits.stall_timeout)"
        return APIError(f"The generation was stopped: {why}.", status=504, type="server_error", code="timeout")


class _Watch:
    """A Deadline over one generation: an asyncio timeout at the total limit, and a check at
    each stall limit that lets the timeout fire only if no token came since. A token costs
    one clock read (moving the timeout at every token re-queued a timer handle each time)."""

    __slots__ = ("deadline", "time", "last", "timeout", "timer", "check")

    def __init__(self, deadline: Deadline):
        self.deadline, self.time = deadline, deadline.loop.time
        self.timeout = asyncio.timeout_at(deadline.end)

    def tick(self) -> None:
        self.last = self.time()

    async def __aenter__(self) -> "_Watch":
        self.timer = await self.timeout.__aenter__()
        self.last = self.time()
        self.check = self.deadline.loop.call_at(self.last + self.deadline.stall, self._check)
        return self

    def _check(self) -> None:
        if self.timer.expired():
            return
        due = self.last + self.deadline.stall
        if self.time() >= due:
            self.timer.reschedule(self.time())  # no token for `stall` seconds: time out now
        else:
            self.check = self.deadline.loop.call_at(due, self._check)

    async def __aexit__(self, *exc) -> Optional[bool]:
        self.check.cancel()
        return await self.timeout.__aexit__(*exc)


_HINTS = {
    "functions": "; send `tools` instead.",
    "function_call": "; send `tool_choice` instead.",
}

_TEXT_SLOT = "\x00text\x00"


def _call_delta(e) -> dict[str, Any]:
    if isinstance(e, tools.Content):
        return {"content": e.text}
    if isinstance(e, tools.CallStart):
        return {"tool_calls": [{"index": e.index, "id": e.id, "type": "function",
                                "function": {"name": e.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]}


def response_schema(fmt) -> Optional[dict[str, Any]]:
    """The JSON schema response_format asks the output to follow (None: free text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    return fmt.json_schema.schema_ or {"type": "object"}


def _json_text(text: str) -> str:
    """A string as JSON, the same characters json.dumps(ensure_ascii=False) writes, by orjson
    (a fifth of the time; it refuses lone surrogates, which json.dumps passes through)."""
    try:
        return orjson.dumps(text).decode()
    except TypeError:
        return json.dumps(text, ensure_ascii=False)


def sse_event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
