"""Chat completions (/v1/chat/completions): the conversation through the alias's chat
template and tool format (llmserve/tools/), then the shared generation."""

from __future__ import annotations

from typing import Callable

from backends.base import CHAT

from .. import tools
from ..errors import APIError, InvalidRequest, to_api_error
from ..schemas import ChatCompletionRequest
from .base import Serving
from .chunks import Shape
from .generation import GenerationServing, Prompt, Result

_UNSUPPORTED = {
    "functions": "; send `tools` instead.",
    "function_call": "; send `tool_choice` instead.",
    "audio": ".",
    "prediction": ".",
    "web_search_options": ".",
}


def chat_tools(serving: Serving, req: ChatCompletionRequest, alias: str) -> tools.ChatTools:
    """A chat request's ChatTools on its alias, its conversation checked against
    limits.max_prompt_chars: the chat route's prompt, shared with tokenize and count_tokens
    (serving/retrieval.py), so they count what the chat route reads."""
    # an adapter's name renders with its base alias's template and tool format
    calls = tools.ChatTools(req, serving.settings.models.get(serving.settings.served_name(alias)[0]))
    serving._check_prompt_size(sum(len(m.text()) for m in req.messages))
    return calls


class ChatServing(GenerationServing):
    async def chat(self, req: ChatCompletionRequest) -> Result:
        alias = req.model or self.settings.default_model
        for name, hint in _UNSUPPORTED.items():
            if getattr(req, name) is not None:
                raise InvalidRequest(f"`{name}` is not supported by this server" + hint, param=name,
                                     code="unsupported_parameter")
        if req.modalities not in (None, ["text"]):
            raise InvalidRequest("Only text output is supported (`modalities: [\"text\"]`).", param="modalities",
                                 code="unsupported_parameter")
        calls = chat_tools(self, req, alias)

        async def encode(backend) -> list[Prompt]:
            return [Prompt(await calls.encode(backend))]

        shape = Shape(chat=True, calls=calls, logprobs=req.logprobs_k() is not None)
        return await self._generate(alias, CHAT, req, encode, shape, "messages", calls)

    async def chat_for(self, req: ChatCompletionRequest, rename: Callable[[APIError], APIError]) -> Result:
        """chat() on behalf of another API front (Responses, Anthropic): a refusal names the field
        of that front's request (``rename``) instead of the chat field it became."""
        try:
            return await self.chat(req)
        except Exception as exc:
            err = to_api_error(exc)
            if err is None:
                raise
            raise rename(err) from exc
