"""Request bodies of the OpenAI-compatible API, validated by pydantic.

The same models type the BentoML-native APIs in service.py, so both surfaces accept
exactly the same fields. Unknown fields are ignored, as OpenAI-compatible servers
(vLLM) do, so clients that send extra options keep working.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

INT64_MAX = 2**63 - 1
MAX_PROMPTS = 64  # prompts in one completions request (each runs n choices)  # seeds: what vLLM and torch.Generator take
# below this a temperature is greedy sampling (vLLM's epsilon): dividing logits by it would
# overflow them to inf and sampling would fail
GREEDY_BELOW = 1e-5


class _NullIsUnset(BaseModel):
    """``null`` for a field means "not given" (OpenAI's spec marks these fields nullable, and its
    clients send nulls for options left unset): the field takes its default."""

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data):
        if isinstance(data, dict) and None in data.values():
            return {k: v for k, v in data.items() if v is not None}
        return data


class _Body(_NullIsUnset):
    # NaN and infinities are refused for every float field (json.loads reads them from NaN and
    # Infinity), so no range check can be passed by a value that compares false to everything
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        """Refuses text holding a lone UTF-16 surrogate ("\\ud800" in JSON): no engine can
        encode it to bytes. Checked over the whole body, nested tool schemas included."""
        where = _surrogate_at(data, "")
        if where is not None:
            raise PydanticCustomError(
                "invalid_unicode", "holds a lone UTF-16 surrogate, which is not valid Unicode text",
                {"field": where or "body"})
        return data


class TextPart(_NullIsUnset):
    type: Literal["text"]
    text: str


class ToolCallFunction(_NullIsUnset):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_NullIsUnset):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class FunctionDef(_NullIsUnset):
    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: Optional[bool] = None


class Tool(_NullIsUnset):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_NullIsUnset):
    name: str


class NamedToolChoice(_NullIsUnset):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_NullIsUnset):
    model_config = ConfigDict(populate_by_name=True)

    name: str
    description: Optional[str] = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_NullIsUnset):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a `json_schema` object")
        return self


class ChatMessage(_NullIsUnset):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant's earlier calls
    tool_call_id: Optional[str] = None  # a tool message answers this call

    @model_validator(mode="after")
    def _content_where_needed(self):
        # OpenAI answers 400 to these too: only an assistant message that calls tools may lack content
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs `content`")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs `tool_call_id`")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_NullIsUnset):
    include_usage: bool = False


class SamplingFields(_Body):
    """Fields shared by chat and text completions."""

    model: Optional[str] = Field(None, description="alias from configuration.yaml; default_model when empty")
    # StrictInt: `true` is not 1, "10" is not 10 (OpenAI refuses both)
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[StrictInt] = Field(None, ge=-1, le=2**31 - 1)
    stop: Union[str, list[str], None] = None
    seed: Optional[StrictInt] = Field(None, ge=-(2**63), le=INT64_MAX)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: StrictInt = Field(1, ge=1, le=16, description="choices to generate (at most 16 here)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # vLLM's extension
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # vLLM's extension
    logit_bias: Optional[dict[str, float]] = None  # token id (as a string) -> -100..100
    ignore_eos: bool = False  # vLLM's extension, used by the benchmarks
    # hints only, accepted and ignored as documented in the README
    user: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v):
        for token, bias in (v or {}).items():
            if not token.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids; {token!r} is not one")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must lie in [-100, 100]; {token} has {bias}")
        return v

    @field_validator("temperature")
    @classmethod
    def _greedy_when_tiny(cls, v):
        return 0.0 if v < GREEDY_BELOW else v

    @model_validator(mode="after")
    def _seeds_fit(self):
        # choice i samples with seed + i: the last one must still be a 64-bit integer
        if self.seed is not None and self.seed + self.n - 1 > INT64_MAX:
            raise PydanticCustomError(
                "seed_range", "seed + n - 1 must fit in a signed 64-bit integer (at most {max}); got seed {seed} "
                "with n {n}", {"field": "seed", "max": INT64_MAX, "seed": self.seed, "n": self.n})
        return self

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    # vLLM's extension: the answer continues the last (assistant) message instead of opening a new
    # turn (a prefill: Anthropic's final assistant turn); the answer holds the continuation only
    continue_final_message: bool = False
    # OpenAI fields this server does not implement: a request using them gets a 400 naming them
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    modalities: Optional[list[str]] = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.continue_final_message and (self.messages[-1].role != "assistant" or self.messages[-1].tool_calls):
            raise PydanticCustomError("continue_final_message", "continue_final_message continues the last "
                                      "message: it must be an assistant message with content and no tool_calls",
                                      {"field": "continue_final_message"})
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice needs `tools`")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice names {name!r}, which is not among `tools`")
        return self

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt_logprobs_k(self) -> Optional[int]:
        return None

    def sequences(self) -> int:
        """Generations this request runs at once (what max_pending counts)."""
        return self.n


class CompletionRequest(SamplingFields):
    # one prompt or several, as text or token ids: one set of n choices per prompt
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    # 0 with echo: the prompt (and its logprobs) only, as evaluation harnesses ask
    max_tokens: Optional[StrictInt] = Field(None, ge=0)
    echo: bool = False
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=5)  # OpenAI's range for completions
    # OpenAI fields this server does not implement: a request using them gets a 400 naming them
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, str) or (v and isinstance(v[0], int)):
            v = [v]  # one text, or one prompt of token ids
        if not v:
            raise ValueError("prompt must not be empty")
        if len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        for p in v:
            if isinstance(p, list) and not p:
                raise ValueError("a prompt of token ids must not be empty")
            if isinstance(p, list) and any(t < 0 for t in p):
                raise ValueError("token ids must not be negative")
        return v

    @model_validator(mode="after")
    def _zero_tokens_with_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise PydanticCustomError("max_tokens_zero", "max_tokens 0 asks for no completion: it needs echo: true "
                                      "(the prompt and its logprobs)", {"field": "max_tokens"})
        return self

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def logprobs_k(self) -> Optional[int]:
        return self.logprobs

    def prompt_logprobs_k(self) -> Optional[int]:
        """echo with logprobs: the prompt tokens' logprobs too (vLLM's prompt_logprobs)."""
        return self.logprobs if self.echo else None

    def sequences(self) -> int:
        return self.n * len(self.prompt)


class EmbeddingRequest(_Body):
    model: Optional[str] = Field(None, description="alias; embedding_model when empty")
    # text, texts, or (as OpenAI takes them) token ids: one list of ids, or a list of them
    input: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[StrictInt] = Field(None, ge=1)  # served only where it is the model's own size

    @field_validator("input")
    @classmethod
    def _inputs(cls, v):
        inputs = [v] if isinstance(v, str) or (v and isinstance(v[0], int)) else v
        if not inputs:
            raise ValueError("input must not be empty")
        if any(not s for s in inputs):
            raise ValueError("input strings and token lists must not be empty")
        if any(t < 0 for ids in inputs if isinstance(ids, list) for t in ids):
            raise ValueError("token ids must not be negative")
        return inputs

    def token_ids(self) -> bool:
        """The input is token ids rather than text."""
        return isinstance(self.input[0], list)


def _surrogate_at(value: Any, path: str) -> Optional[str]:
    """The dotted path of the first string (or key) in ``value`` holding a lone surrogate."""
    if isinstance(value, str):
        return None if _encodable(value) else path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        name = str(key).encode("utf-8", "backslashreplace").decode()
        name = f"{path}.{name}" if path else name
        if isinstance(key, str) and not _encodable(key):
            return name
        found = _surrogate_at(item, name)
        if found is not None:
            return found
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")  # at C speed: prompts run to 200k characters
    except UnicodeEncodeError:
        return False
    return True
