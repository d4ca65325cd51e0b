"""Retrieval operations: rerank, score, tokenize and detokenize (issue 33), and the prompt token
count of a chat request (Anthropic's count_tokens). The wire format lives in
llmserve/retrieval_schemas.py; the routes in llmserve/web/retrieval.py and service.py.

Rerank and score run on the alias's score type (its /v1/models entry says which, in vLLM's words):
a cross-encoder (task: rerank) reads each (query, document) pair through its engine's score();
an embedding alias (a bi-encoder) embeds the texts, each once, and scores pairs by the cosine
similarity of their vectors, as vLLM scores embedding models. Both engines' paths batch
concurrent requests (the embedding batcher, the cross-encoder's batcher, vLLM's own scheduler).
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Optional

from backends.base import CHAT, EMBEDDINGS, RERANK, Backend

from .. import tools
from ..errors import APIError, InvalidRequest, internal_error, to_api_error
from ..retrieval_schemas import DetokenizeRequest, RerankRequest, ScoreRequest, TokenizeRequest
from ..schemas import ChatCompletionRequest
from .base import Serving

# how each score type is served: the capability the alias's engine needs
_SERVED_BY = {"cross-encoder": RERANK, "bi-encoder": EMBEDDINGS}


class RetrievalServing(Serving):
    # -- tokens -------------------------------------------------------------------------------
    async def count_chat_tokens(self, req: ChatCompletionRequest) -> int:
        """The prompt tokens the chat route reports as usage.prompt_tokens for this request: the
        same template, tools rendering and alias default."""
        alias = req.model or self.settings.default_model
        async with self.manager.use(alias, CHAT, sequences=0) as backend:
            return len(await self._chat_ids(req, alias, backend))

    async def _chat_ids(self, req: ChatCompletionRequest, alias: str, backend: Backend) -> list[int]:
        """The chat route's prompt ids (serving/chat.py: ChatTools' encode)."""
        calls = tools.ChatTools(req, self.settings.models.get(alias))
        self._check_prompt_size(sum(len(m.text()) for m in req.messages))
        return await calls.encode(backend)

    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        """vLLM's /tokenize: a prompt's ids, or a conversation's through the chat route's path."""
        alias = req.model or self.settings.default_model
        if req.return_token_strs:
            raise InvalidRequest("`return_token_strs` is not supported by this server.", param="return_token_strs",
                                 code="unsupported_parameter")
        if req.messages is None:
            self._check_chars(len(req.prompt), "prompt")
            # sequences=0: tokenizing takes no place in the engine's batch (nor its max_pending)
            async with self.manager.use(alias, None, sequences=0) as backend:
                ids = await self._engine_call(backend, backend.encode_text(req.prompt, req.add_special_tokens is not False))
                return _tokens(ids, backend)
        if req.add_special_tokens:
            raise InvalidRequest("`add_special_tokens` with `messages` is not supported by this server: the chat "
                                 "template writes the special tokens the model wants.", param="add_special_tokens",
                                 code="unsupported_value")
        chat = ChatCompletionRequest.model_validate({"model": alias, "messages": req.messages, "tools": req.tools})
        async with self.manager.use(alias, CHAT, sequences=0) as backend:
            rendering = backend if req.add_generation_prompt else _WithoutGenerationPrompt(backend)
            return _tokens(await self._chat_ids(chat, alias, rendering), backend)

    async def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        alias = req.model or self.settings.default_model
        async with self.manager.use(alias, None, sequences=0) as backend:
            vocab = backend.vocab_size()
            if vocab is not None and any(t >= vocab for t in req.tokens):
                raise InvalidRequest(f"`tokens` holds a token id outside this model's vocabulary (0..{vocab - 1}).",
                                     param="tokens", code="invalid_value")
            decode = getattr(backend, "decode", None)
            if decode is None:
                raise InvalidRequest(f"Detokenizing is not supported by the {backend.name} engine that serves this "
                                     "model.", param="model", code="unsupported_capability")
            return {"prompt": await self._engine_call(backend, decode(req.tokens))}

    # -- relevance ----------------------------------------------------------------------------
    async def rerank(self, req: RerankRequest, version: int = 1) -> dict[str, Any]:
        """The documents by relevance to the query (Cohere's / Jina's shape; ``version`` 2: Cohere v2)."""
        alias = req.model or self.settings.embedding_model or self.settings.default_model
        docs = req.texts()
        self._check_documents(len(docs), len(req.query) + sum(map(len, docs)), "documents")
        values, tokens = await self._scores(alias, [(req.query, d) for d in docs], "documents")
        order = sorted(range(len(docs)), key=lambda i: -values[i])[:req.top_n or len(docs)]
        results = [{"index": i, "relevance_score": values[i],
                    **({"document": {"text": docs[i]}} if req.return_documents else {})} for i in order]
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": alias, "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "meta": {"api_version": {"version": str(version)}, "billed_units": {"search_units": 1}}}

    async def score(self, req: ScoreRequest) -> dict[str, Any]:
        """One score per pair (vLLM's /score)."""
        alias = req.model or self.settings.embedding_model or self.settings.default_model
        pairs = req.pairs()
        self._check_documents(len(pairs), sum(len(a) + len(b) for a, b in pairs), "text_2")
        values, tokens = await self._scores(alias, pairs, "text_2")
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "model": alias,
                "data": [{"index": i, "object": "score", "score": v} for i, v in enumerate(values)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def _scores(self, alias: str, pairs: list[tuple[str, str]], param: str) -> tuple[list[float], int]:
        """Each pair's relevance and the prompt tokens read, on the alias's score type."""
        kind = self.manager.config(alias).score_type()
        if kind is None:  # refused before a generation model is loaded for nothing
            raise InvalidRequest(f"Model {alias!r} cannot rerank or score: it is a generation model (task "
                                 f"{self.manager.config(alias).task}). Pick a rerank or embedding model (GET /v1/models "
                                 "lists each one's score_type).", param="model", code="unsupported_capability")
        async with self.manager.use(alias, _SERVED_BY[kind]) as backend:
            if kind == "cross-encoder":
                result = await self._engine_call(backend, backend.score(pairs), param)
                return result.values, result.prompt_tokens
            texts = list(dict.fromkeys(t for pair in pairs for t in pair))  # each text embedded once
            result = await self._engine_call(backend, backend.embed(texts), param)
        vectors = dict(zip(texts, result.vectors))
        return [_cosine(vectors[a], vectors[b]) for a, b in pairs], result.prompt_tokens

    @staticmethod
    async def _engine_call(backend: Backend, work, param: Optional[str] = None):
        """An engine call's answer; its errors as API errors (the input an engine names, "input"
        of embeddings or "documents" of a cross-encoder, is the request's ``param``)."""
        try:
            return await work
        except Exception as exc:
            err = to_api_error(exc) or internal_error(exc, f"The {backend.name} engine failed.")
            if param and err.param in ("input", "documents"):
                err.param, err.message = param, err.message.replace(f"{err.param}[", f"{param}[", 1)
            raise err from exc

    def _check_documents(self, count: int, chars: int, param: str) -> None:
        limit = self.settings.limits.max_rerank_documents
        if count > limit:
            raise InvalidRequest(f"{count} {param} given; at most {limit} per request (limits.max_rerank_documents).",
                                 param=param, code="too_many_inputs")
        self._check_chars(chars, param)

    def _check_chars(self, chars: int, param: str) -> None:
        try:
            self._check_prompt_size(chars)
        except APIError as exc:
            exc.param = param
            raise


class _WithoutGenerationPrompt:
    """A backend whose chat rendering leaves out the assistant turn's opening (tokenize's
    add_generation_prompt: false), so ChatTools renders tools and templates as for a chat."""

    def __init__(self, backend: Backend):
        self._backend = backend

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    async def encode_chat(self, messages, tools=None, template=None):
        return await self._backend.encode_chat(messages, tools=tools, template=template, generation_prompt=False)


def _tokens(ids: list[int], backend: Backend) -> dict[str, Any]:
    return {"count": len(ids), "max_model_len": backend.context_length(), "tokens": ids, "token_strs": None}


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return max(-1.0, min(1.0, dot / norm)) if norm else 0.0  # rounding can pass 1 for equal texts
