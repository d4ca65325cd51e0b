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
from typing import Any, Awaitable, Callable, Optional

from pydantic import ValidationError

from backends.base import CHAT, EMBEDDINGS, RERANK, Backend
from backends.errors import EngineError

from ..errors import APIError, InvalidRequest, engine_failed, validation_error_to_api_error
from ..retrieval_schemas import DetokenizeRequest, RerankRequest, ScoreRequest, TokenizeRequest
from ..schemas import ChatCompletionRequest
from .base import Serving
from .chat import chat_tools

# tokenize fields of vLLM's this server refuses: the chat route renders with the alias's template only
_TEMPLATE_FIELDS = ("chat_template", "chat_template_kwargs")


class RetrievalServing(Serving):
    # -- tokens -------------------------------------------------------------------------------
    async def count_chat_tokens(self, req: ChatCompletionRequest) -> int:
        """The prompt tokens the chat route reports as usage.prompt_tokens for this request: the
        same template, tools rendering and alias default."""
        alias = req.model or self.settings.default_model
        async with self.manager.use(alias, CHAT, sequences=0) as backend:
            return len(await chat_tools(self, req, alias).encode(backend))

    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        """vLLM's /tokenize: a prompt's ids, or a conversation's through the chat route's path."""
        alias = req.model or self.settings.default_model
        for name in _TEMPLATE_FIELDS:
            if getattr(req, name) is not None:
                raise InvalidRequest(f"`{name}` is not supported by this server: a conversation is tokenized with "
                                     "the alias's chat template, as the chat route renders it.", param=name,
                                     code="unsupported_parameter")
        if req.messages is None:
            self._check_chars(len(req.prompt), "prompt")
            # sequences=0: tokenizing takes no place in the engine's batch (nor its max_pending)
            async with self.manager.use(alias, None, sequences=0) as backend:
                ids = await self._engine_call(backend, backend.encode_text(req.prompt, req.add_special_tokens is not False))
                return await self._tokens(ids, backend, req.return_token_strs)
        if req.add_special_tokens:
            raise InvalidRequest("`add_special_tokens` with `messages` is not supported by this server: the chat "
                                 "template writes the special tokens the model wants.", param="add_special_tokens",
                                 code="unsupported_value")
        try:  # the chat route's own checks (continue_final_message needs a final assistant message)
            chat = ChatCompletionRequest.model_validate({"model": alias, "messages": req.messages, "tools": req.tools,
                                                         "continue_final_message": req.continue_final_message})
        except ValidationError as exc:
            raise validation_error_to_api_error(exc.errors()) from None
        async with self.manager.use(alias, CHAT, sequences=0) as backend:
            ids = await chat_tools(self, chat, alias).encode(backend, generation_prompt=req.add_generation_prompt)
            return await self._tokens(ids, backend, req.return_token_strs)

    async def _tokens(self, ids: list[int], backend: Backend, strs: bool) -> dict[str, Any]:
        token_strs = None
        if strs:
            convert = getattr(backend, "token_strs", None)
            if convert is None:
                raise InvalidRequest(f"`return_token_strs` is not supported by the {backend.name} engine that serves "
                                     "this model.", param="return_token_strs", code="unsupported_parameter")
            token_strs = await self._engine_call(backend, convert(ids))
        return {"count": len(ids), "max_model_len": backend.context_length(), "tokens": ids, "token_strs": token_strs}

    async def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        """vLLM's /detokenize: the text of the ids, special tokens kept (vLLM's tokenizer.decode), so
        what /tokenize gave with add_special_tokens or from messages comes back whole."""
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
            return {"prompt": await self._engine_call(backend, decode(req.tokens, special=True))}

    # -- relevance ----------------------------------------------------------------------------
    async def rerank(self, req: RerankRequest, version: int = 1) -> dict[str, Any]:
        """The documents by relevance to the query (Cohere's / Jina's shape; ``version`` 2: Cohere v2)."""
        alias = req.model or self.settings.embedding_model or self.settings.default_model
        docs = req.texts()
        self._check_count(len(docs), "documents")
        pairs = _Pairs([(req.query, d) for d in docs], ("query", "documents"),
                       [("query", f"documents.{i}") for i in range(len(docs))])
        values, tokens = await self._scores(alias, pairs)
        order = sorted(range(len(docs)), key=lambda i: -values[i])[:req.top_n or len(docs)]
        results = [{"index": i, "relevance_score": values[i],
                    **({"document": {"text": docs[i]}} if req.return_documents else {})} for i in order]
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": alias, "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "meta": {"api_version": {"version": str(version)}, "billed_units": {"search_units": 1}}}

    async def score(self, req: ScoreRequest) -> dict[str, Any]:
        """One score per pair (vLLM's /score)."""
        alias = req.model or self.settings.embedding_model or self.settings.default_model
        texts = req.pairs()
        self._check_count(len(texts), "text_2")

        def name(field: str, value, i: int) -> str:
            return field if isinstance(value, str) else f"{field}.{i if len(value) > 1 else 0}"

        names = [(name("text_1", req.text_1, i), name("text_2", req.text_2, i)) for i in range(len(texts))]
        values, tokens = await self._scores(alias, _Pairs(texts, ("text_1", "text_2"), names))
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "model": alias,
                "data": [{"index": i, "object": "score", "score": v} for i, v in enumerate(values)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def _scores(self, alias: str, pairs: "_Pairs") -> tuple[list[float], int]:
        """Each pair's relevance and the prompt tokens read, on the alias's score type."""
        kind = self.manager.config(alias).score_type()
        if kind is None:  # refused before a generation model is loaded for nothing
            raise InvalidRequest(f"Model {alias!r} cannot rerank or score: it is a generation model (task "
                                 f"{self.manager.config(alias).task}). Pick a rerank or embedding model (GET /v1/models "
                                 "lists each one's score_type).", param="model", code="unsupported_capability")
        if kind == "cross-encoder":
            self._check_reads(pairs, [a for a, _ in pairs.texts], [b for _, b in pairs.texts], "every pair is read whole, the first text once per pair")
            async with self.manager.use(alias, RERANK) as backend:
                async def rename(exc: EngineError) -> None:  # exc.index: the pair
                    first, second = pairs.names[exc.index]
                    if exc.code == "context_length_exceeded":  # the query alone may be what is too long
                        query = await backend.encode_text(pairs.texts[exc.index][0])
                        if len(query) >= backend.context_length():
                            exc.param, exc.message = first, (
                                f"{first} has {len(query)} tokens by itself, more than this model's maximum of "
                                f"{backend.context_length()} for a pair; shorten it.")
                            return
                    _rename(exc, second)

                result = await self._engine_call(backend, backend.score(pairs.texts), rename)
                return result.values, result.prompt_tokens
        # a bi-encoder embeds each text once, and names the first field that held it
        where: dict[str, str] = {}
        for (a, b), (name_a, name_b) in zip(pairs.texts, pairs.names):
            where.setdefault(a, name_a)
            where.setdefault(b, name_b)
        texts = list(where)
        firsts = {a for a, _ in pairs.texts}
        self._check_reads(pairs, list(firsts), [t for t in texts if t not in firsts], "each text is embedded once")
        async with self.manager.use(alias, EMBEDDINGS) as backend:
            async def rename(exc: EngineError) -> None:  # exc.index: the text
                _rename(exc, where[texts[exc.index]])

            result = await self._engine_call(backend, backend.embed(texts), rename)
        vectors = dict(zip(texts, result.vectors))
        return [_cosine(vectors[a], vectors[b]) for a, b in pairs.texts], result.prompt_tokens

    @staticmethod
    async def _engine_call(backend: Backend, work: Awaitable,
                           rename: Optional[Callable[[EngineError], Awaitable[None]]] = None):
        """An engine call's answer; its errors as API errors: an input the engine names by its
        place in what it was given (``index``) named as the request's field (``rename``); an
        unload under the call a 503 to retry."""
        try:
            return await work
        except Exception as exc:
            if rename is not None and isinstance(exc, EngineError) and exc.index is not None:
                await rename(exc)
            raise engine_failed(exc, backend.name) from exc  # an Unloaded is a 503 to retry

    def _check_count(self, count: int, param: str) -> None:
        limit = self.settings.limits.max_rerank_documents
        if count > limit:
            raise InvalidRequest(f"{count} {param} given; at most {limit} per request (limits.max_rerank_documents).",
                                 param=param, code="too_many_inputs")

    def _check_reads(self, pairs: "_Pairs", firsts: list[str], seconds: list[str], how: str) -> None:
        """limits.max_prompt_chars over what the engine reads (``how``), naming the side that holds
        the more of it: a cross-encoder reads a rerank's query once per document."""
        one, two = sum(map(len, firsts)), sum(map(len, seconds))
        limit = self.settings.limits.max_prompt_chars
        if one + two > limit:
            first, second = pairs.sides
            raise InvalidRequest(f"The engine would read {one + two} characters for this request ({how}: {one} of "
                                 f"{first}, {two} of {second}), more than this server's limit of {limit} "
                                 "(limits.max_prompt_chars).", param=first if one >= two else second,
                                 code="context_length_exceeded")

    def _check_chars(self, chars: int, param: str) -> None:
        try:
            self._check_prompt_size(chars)
        except APIError as exc:
            exc.param = param
            raise


class _Pairs:
    """A rerank's or score's (first, second) texts, the request's two fields (``sides``) and each
    pair's own field names (``names``: "query" and "documents.3", "text_1.0" and "text_2.2")."""

    def __init__(self, texts: list[tuple[str, str]], sides: tuple[str, str], names: list[tuple[str, str]]):
        self.texts, self.sides, self.names = texts, sides, names


def _rename(exc: EngineError, name: str) -> None:
    """An engine error about its input ``param[index]`` said of the request's field ``name``."""
    exc.message = exc.message.replace(f"{exc.param}[{exc.index}]", name, 1)
    exc.param = name


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return max(-1.0, min(1.0, dot / norm)) if norm else 0.0  # rounding can pass 1 for equal texts
