"""Request bodies of the OpenAI-compatible API, validated by pydantic.

The same models type the BentoML-native APIs in service.py, so both surfaces accept
exactly the same fields. Unknown fields are ignored, as OpenAI-compatible servers
(vLLM) do, so clients that send extra options keep working.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class FunctionDef(BaseModel):
    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: Optional[bool] = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str
    description: Optional[str] = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a `json_schema` object")
        return self


class ChatMessage(BaseModel):
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


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(_Body):
    """Fields shared by chat and text completions."""

    model: Optional[str] = Field(None, description="alias from configuration.yaml; default_model when empty")
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=16, description="choices to generate (at most 16 here)")
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
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
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


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)  # OpenAI's range for completions
    # OpenAI fields this server does not implement: a request using them gets a 400 naming them
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if len(prompts) != 1:
            raise ValueError("exactly one prompt is supported per request")
        return prompts[0]

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def logprobs_k(self) -> Optional[int]:
        return self.logprobs


class EmbeddingRequest(_Body):
    model: Optional[str] = Field(None, description="alias; embedding_model when empty")
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"

    @field_validator("input")
    @classmethod
    def _inputs(cls, v):
        inputs = [v] if isinstance(v, str) else v
        if not inputs:
            raise ValueError("input must not be empty")
        if any(not s for s in inputs):
            raise ValueError("input strings must not be empty")
        return inputs
