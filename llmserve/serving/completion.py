"""Text completions (/v1/completions): one prompt or several (text or token ids), n choices
each, with echo and the prompt's logprobs (what evaluation harnesses score with)."""

from __future__ import annotations

from backends.base import COMPLETION, Backend

from ..errors import InvalidRequest
from ..schemas import CompletionRequest
from .chunks import Shape
from .generation import GenerationServing, Prompt, Result


class CompletionServing(GenerationServing):
    async def complete(self, req: CompletionRequest) -> Result:
        alias = req.model or self.settings.default_model
        if req.suffix is not None:
            raise InvalidRequest("`suffix` (fill-in-the-middle) is not supported by this server.", param="suffix",
                                 code="unsupported_parameter")
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidRequest("`best_of` is not supported by this server; ask for `n` choices instead.",
                                 param="best_of", code="unsupported_parameter")
        self._check_prompt_size(sum(len(p) for p in req.prompt if isinstance(p, str)))

        async def encode(backend: Backend) -> list[Prompt]:
            vocab = backend.vocab_size()
            prompts = []
            for k, p in enumerate(req.prompt):
                if isinstance(p, str):
                    prompts.append(Prompt(await backend.encode_text(p), p))
                    continue
                if vocab is not None and any(t >= vocab for t in p):
                    raise InvalidRequest(f"prompt {k} holds a token id outside this model's vocabulary "
                                         f"(0..{vocab - 1}).", param="prompt", code="invalid_value")
                prompts.append(Prompt(list(p), await _decoded(backend, p) if req.echo else ""))
            return prompts

        shape = Shape(chat=False, calls=None, logprobs=req.logprobs is not None, echo=req.echo,
                      prompt_logprobs=req.prompt_logprobs_k() is not None, output=req.max_tokens != 0)
        return await self._generate(alias, COMPLETION, req, encode, shape, "prompt")


async def _decoded(backend: Backend, ids: list[int]) -> str:
    """A token-id prompt's text, for echo."""
    decode = getattr(backend, "decode", None)
    if decode is None:
        raise InvalidRequest(f"`echo` of a token-id prompt is not supported by the {backend.name} engine that "
                             "serves this model; send the prompt as text.", param="echo", code="unsupported_value")
    return await decode(ids)
