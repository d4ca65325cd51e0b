"""Request bodies of the OpenAI Responses API (/v1/responses), validated by pydantic.

What the client sent, apart from what the server does with it (llmserve/serving/responses.py).
``input`` items and ``tools`` arrive as plain objects and are checked here one by one
(``parse_items`` / ``parse_tools``), so that an unknown item or tool type gets a 400 that
names its place (``input.2.type``, ``tools.0.type``) rather than a union's error list.
Unknown top-level fields are ignored, as on the chat route; OpenAI fields this server does
not implement are declared, and a request that uses them gets a 400 naming them.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InvalidRequest, validation_error_to_api_error
from .schemas import _Body

# -- input items -------------------------------------------------------------------------------


class _Item(BaseModel):
    # items echoed back from an earlier response carry ids, statuses, annotations...: ignored
    model_config = ConfigDict(extra="ignore")


class TextContent(_Item):
    type: Literal["input_text", "output_text"]
    text: str


class RefusalContent(_Item):
    type: Literal["refusal"]
    refusal: str


class MessageItem(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, list[Union[TextContent, RefusalContent]]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, TextContent) else p.refusal for p in self.content)


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str = Field(..., min_length=1)
    name: str
    arguments: str  # JSON text


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str = Field(..., min_length=1)
    output: Union[str, list[TextContent]]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


InputItem = Union[MessageItem, FunctionCallItem, FunctionCallOutputItem]
ITEM_TYPES: dict[str, type[_Item]] = {"message": MessageItem, "function_call": FunctionCallItem,
                                     "function_call_output": FunctionCallOutputItem}
CONTENT_TYPES = ("input_text", "output_text", "refusal")

# -- tools ----------------------------------------------------------------------------------------


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class TextFormat(BaseModel):
    """``text.format``: plain text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs `name` and `schema`")
        return self


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: Optional[TextFormat] = None
    verbosity: Optional[str] = None  # a hint for OpenAI's reasoning models: 400 unless null


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="ignore")

    effort: Optional[str] = None
    summary: Optional[str] = None
    generate_summary: Optional[str] = None


# -- the request ---------------------------------------------------------------------------------

ToolChoice = Union[Literal["none", "auto", "required"], dict[str, Any]]


class ResponsesRequest(_Body):  # _Body: a lone surrogate anywhere is a 400, as on the chat routes
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = Field(None, description="alias from configuration.yaml; default_model when empty")
    input: Union[str, list[dict[str, Any]]] = Field(
        ..., description="a string (one user message) or items: message, function_call, function_call_output")
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = None
    store: Optional[bool] = True
    stream: Optional[bool] = False
    tools: Optional[list[dict[str, Any]]] = Field(None, description="function tools only")
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextConfig] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    include: Optional[list[str]] = None
    metadata: Optional[dict[str, str]] = None
    # hints, accepted and not acted on (README, "Responses API")
    user: Optional[str] = None
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    prompt_cache_retention: Optional[str] = None
    service_tier: Optional[str] = None
    stream_options: Optional[dict[str, Any]] = None
    # OpenAI fields this server does not implement: a 400 naming them unless left at their default
    background: Optional[bool] = None
    reasoning: Optional[Reasoning] = None
    truncation: Optional[Literal["auto", "disabled"]] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    max_tool_calls: Optional[int] = Field(None, ge=1)
    conversation: Any = None
    prompt: Any = None
    context_management: Any = None


# -- item and tool checks: a 400 naming the place ---------------------------------------------


def parse_items(raw: list[Any], where: str = "input") -> list[InputItem]:
    """The input items, each validated by its own type; an item without ``type`` is a
    message (OpenAI's EasyInputMessage)."""
    items = []
    for i, obj in enumerate(raw):
        place = f"{where}.{i}"
        if not isinstance(obj, dict):
            raise InvalidRequest(f"{place} must be an object (an input item).", param=place, code="invalid_type")
        kind = obj.get("type", "message")
        model = ITEM_TYPES.get(kind) if isinstance(kind, str) else None
        if model is None:
            raise InvalidRequest(
                f"{place}.type: the item type {kind!r} is not supported by this server; supported: "
                f"{', '.join(ITEM_TYPES)}.", param=f"{place}.type", code="unsupported_value")
        if model is MessageItem and isinstance(obj.get("content"), list):
            for k, part in enumerate(obj["content"]):
                ptype = part.get("type") if isinstance(part, dict) else None
                if ptype not in CONTENT_TYPES:
                    raise InvalidRequest(
                        f"{place}.content.{k}.type: the content type {ptype!r} is not supported by this server "
                        f"(text only: {', '.join(CONTENT_TYPES)}).", param=f"{place}.content.{k}.type",
                        code="unsupported_value")
        items.append(_validate(model, obj, place))
    return items


def parse_tools(raw: list[Any]) -> list[FunctionTool]:
    tools = []
    for i, obj in enumerate(raw):
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind != "function":
            raise InvalidRequest(
                f"tools.{i}.type: {kind!r} tools (OpenAI's built-in tools) are not supported by this server; "
                "only function tools are.", param=f"tools.{i}.type", code="unsupported_value")
        tools.append(_validate(FunctionTool, obj, f"tools.{i}"))
    return tools


def _validate(model: type[BaseModel], obj: dict[str, Any], place: str):
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        # the same 400 as a body's validation error, its locations under the item's place
        raise validation_error_to_api_error(
            [{**e, "loc": (*place.split("."), *e["loc"])} for e in exc.errors()]) from None
