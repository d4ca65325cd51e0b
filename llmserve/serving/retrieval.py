"""Retrieval operations: tokenize, detokenize, rerank and score (issue 33), and the prompt token
count of a chat request (Anthropic's count_tokens). The wire format lives in
llmserve/retrieval_schemas.py; the routes in llmserve/web/retrieval.py and service.py."""

from __future__ import annotations

from backends.base import CHAT, Backend

from .. import tools
from ..schemas import ChatCompletionRequest
from .base import Serving


class RetrievalServing(Serving):
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
