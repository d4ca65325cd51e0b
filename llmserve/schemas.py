"""Request bodies of the OpenAI-compatible API, validated by pydantic.

The same models type the BentoML-native APIs in service.py, so both surfaces accept
exactly the same fields. Unknown fields are ignored, as OpenAI-compatible servers
(vLLM) do, so clients that send extra options keep working.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

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
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    ignore_eos: bool = False  # vLLM's extension, used by the benchmarks

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

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str]]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if len(prompts) != 1:
            raise ValueError("exactly one prompt is supported per request")
        return prompts[0]

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens


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
