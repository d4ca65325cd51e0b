"""Embeddings (/v1/embeddings): texts, or token ids of the served model's vocabulary, through
the alias's embedding engine (concurrent requests are batched there)."""

from __future__ import annotations

import base64
import struct
from typing import Any

from backends.base import EMBEDDINGS, Backend

from ..errors import InvalidRequest, engine_failed
from ..schemas import EmbeddingRequest
from ..token_input import token_id_texts
from .base import Serving


class EmbeddingServing(Serving):
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
                raise engine_failed(exc, backend.name) from exc
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
        # ids that do not look like this model's tokens (another vocabulary's: LangChain's default
        # client sends tiktoken's) are refused with a 400 saying how to send text instead
        return await token_id_texts(req.input, backend.vocab_size(), decode, backend.encode_text)
