"""What every OpenAI-family operation shares once a request is validated: the settings, the
model manager, the prompt-size limit and the sampling parameters built from a request.

Each API family is a serving class on this base (chat.py, completion.py, embedding.py,
models.py; responses.py fronts the chat one); OpenAIOperations (serving/__init__.py) joins
them for the HTTP routes and the BentoML APIs. Everything a client can get wrong is raised
as an APIError (4xx) before the first byte is sent.
"""

from __future__ import annotations

from typing import Any, Optional

from backends.base import Backend, SamplingParams

from ..config import Settings
from ..errors import InvalidRequest
from ..manager import ModelManager


class Serving:
    def __init__(self, manager: ModelManager, settings: Settings):
        self.manager = manager
        self.settings = settings

    def _check_prompt_size(self, chars: int) -> None:
        limit = self.settings.limits.max_prompt_chars
        if chars > limit:
            raise InvalidRequest(
                f"The prompt has {chars} characters, more than this server's limit of {limit} "
                "(limits.max_prompt_chars).",
                code="context_length_exceeded",
            )

    def _sampling(self, req, prompt_tokens: int, backend: Backend, calls=None, prompt_field: str = "prompt"
                  ) -> SamplingParams:
        """The request's sampling parameters for a prompt of ``prompt_tokens`` tokens. Without
        max_tokens a generation may run to the end of the context, bounded by limits.max_tokens
        (or limits.default_max_tokens where set), as OpenAI and vLLM let it."""
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
                param=prompt_field,
                code="context_length_exceeded",
            )
        cap = limits.default_max_tokens or limits.max_tokens
        max_tokens = asked if asked is not None else min(cap, ctx - prompt_tokens)
        bias = {int(t): b for t, b in (req.logit_bias or {}).items()}
        vocab = backend.vocab_size()
        if vocab is not None and any(not 0 <= t < vocab for t in bias):
            raise InvalidRequest(f"logit_bias names a token id outside this model's vocabulary (0..{vocab - 1}).",
                                 param="logit_bias", code="invalid_value")
        params = SamplingParams(
            max_tokens=max(max_tokens, 1),  # max_tokens 0 (echo only): one token is made and not shown
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
            prompt_logprobs=req.prompt_logprobs_k(),
        )
        if calls is not None:  # tool_choice "required" / named: calls in the model's format; else response_format
            params.tool_grammar = calls.grammar()
            params.json_schema = None if params.tool_grammar else response_schema(req.response_format)
        for name in sorted(params.features() - backend.features):
            field = _FIELDS.get(name, name)
            raise InvalidRequest(f"`{field}` is not supported by the {backend.name} engine that serves this model.",
                                 param=field.split(" ")[0], code="unsupported_parameter")
        return params


# SamplingParams.features() names that are not the request field a client sent
_FIELDS = {"prompt_logprobs": "echo with logprobs"}


def response_schema(fmt) -> Optional[dict[str, Any]]:
    """The JSON schema response_format asks the output to follow (None: free text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    return fmt.json_schema.schema_ or {"type": "object"}
