"""The OpenAI-compatible operations, shared by the HTTP routes and the BentoML APIs.

chat / complete / embed take a validated request and return either one response
dict or (stream=True) an async iterator of chunk dicts. Everything a client can get
wrong is raised as an APIError (4xx) before the first byte is sent.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import time
import uuid
from typing import Any, AsyncIterator, Union

from backends.base import CHAT, COMPLETION, EMBEDDINGS, Backend, Delta, SamplingParams, with_stops
from .config import Settings
from .errors import APIError, EngineError, InvalidRequest
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
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        self._check_prompt_size(sum(len(m["content"]) for m in messages))
        return await self._run(alias, CHAT, req, lambda b: b.encode_chat(messages))

    async def complete(self, req: CompletionRequest) -> Result:
        alias = req.model or self.settings.default_model
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
            try:
                result = await backend.embed(req.input)
            except APIError:
                raise
            except Exception as exc:
                log.exception("embedding failed on %s", alias)
                raise EngineError(f"The {backend.name} engine failed: {type(exc).__name__}: {exc}") from exc
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

    def _sampling(self, req, prompt_tokens: int, backend: Backend) -> SamplingParams:
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
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k if req.top_k and req.top_k > 0 else None,
            stop=req.stop_list(),
            seed=req.seed,
            ignore_eos=req.ignore_eos,
        )

    async def _run(self, alias: str, capability: str, req, encode) -> Result:
        chat = capability == CHAT
        # the manager's context is entered by hand: for a stream it stays open until the
        # last chunk is sent, long after this function has returned
        use = self.manager.use(alias, capability)
        backend = await use.__aenter__()
        try:
            prompt_ids = await encode(backend)
            params = self._sampling(req, len(prompt_ids), backend)
        except BaseException as exc:
            await use.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        metrics = RequestMetrics(alias, len(prompt_ids))
        deltas = with_stops(backend.generate(prompt_ids, params), params.stop)
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": alias,
            "object": "chat.completion" if chat else "text_completion",
        }
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream(use, backend, deltas, meta, len(prompt_ids), metrics, chat, include_usage)
        try:
            return await self._collect(backend, deltas, meta, len(prompt_ids), metrics, chat)
        finally:
            await use.__aexit__(None, None, None)

    async def _collect(self, backend, deltas, meta, prompt_tokens, metrics, chat) -> dict[str, Any]:
        text, last = [], Delta("", 0, "stop")
        try:
            async for d in deltas:
                metrics.on_delta(d)
                text.append(d.text)
                last = d
        except APIError:
            metrics.finish("error")
            raise
        except Exception as exc:
            metrics.finish("error")
            log.exception("generation failed on %s", meta["model"])
            raise EngineError(f"The {backend.name} engine failed: {type(exc).__name__}: {exc}") from exc
        metrics.finish(last.finish_reason or "stop")
        content = "".join(text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": last.finish_reason or "stop", "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        return {**meta, "choices": [choice], "usage": _usage(prompt_tokens, last.completion_tokens)}

    async def _stream(self, use, backend, deltas, meta, prompt_tokens, metrics, chat, include_usage):
        """The stream as Server-Sent Events, ending with ``data: [DONE]``."""
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
        # token costs one small json.dumps (the per-chunk path is the front end's budget)
        head, _, tail = sse_event(chunk(_TEXT_SLOT)).partition(json.dumps(_TEXT_SLOT))
        status = "aborted"
        try:
            if chat:
                yield sse_event(chunk(role=True))
            completion_tokens = 0
            async for d in deltas:
                metrics.on_delta(d)
                completion_tokens = d.completion_tokens
                if d.finish_reason:
                    status = d.finish_reason
                    yield sse_event(chunk(d.text, d.finish_reason))
                elif d.text:
                    yield head + json.dumps(d.text, ensure_ascii=False) + tail
            if include_usage:
                yield sse_event({**meta, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        except APIError as exc:
            status = "error"
            yield sse_event(exc.body())
        except Exception as exc:
            status = "error"
            log.exception("generation failed on %s", meta["model"])
            yield sse_event(EngineError(f"The {backend.name} engine failed: {type(exc).__name__}: {exc}").body())
        finally:
            # runs too when the client goes away: closing `deltas` stops the engine's work
            metrics.finish(status)
            await deltas.aclose()
            await use.__aexit__(None, None, None)
        yield "data: [DONE]\n\n"


_TEXT_SLOT = "\x00text\x00"


def sse_event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
