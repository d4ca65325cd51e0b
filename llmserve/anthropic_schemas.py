"""Request bodies of Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens),
validated by pydantic.

What the client sent, apart from what the server does with it (llmserve/serving/anthropic.py).
Content blocks arrive as plain objects and are checked one by one, so that a block this server
does not serve (an image, a document, thinking) gets a 400 naming its place
(``messages.2.content.0.type``) rather than a union's error list. ``cache_control`` and
``citations`` on a block are accepted and ignored (hints about caching and history that change
nothing in the answer); unknown top-level fields are ignored, as on the OpenAI routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictInt, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .errors import field_path
from .schemas import _Body

MAX_STOP_SEQUENCES = 64

# -- content blocks ----------------------------------------------------------------------------


class _Block(BaseModel):
    # cache_control, citations: accepted and ignored
    model_config = ConfigDict(extra="ignore")


class TextBlock(_Block):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str = Field(..., min_length=1)
    name: str = Field(..., min_length=1)
    input: dict[str, Any]


# between the text blocks of one turn (and of one tool result) in the chat message they become
BLOCK_SEPARATOR = "\n\n"


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str = Field(..., min_length=1)
    content: Union[str, list[dict[str, Any]]] = ""
    is_error: bool = False

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return BLOCK_SEPARATOR.join(b["text"] for b in self.content)


Block = Union[TextBlock, ToolUseBlock, ToolResultBlock]
BLOCKS: dict[str, type[_Block]] = {"text": TextBlock, "tool_use": ToolUseBlock, "tool_result": ToolResultBlock}
# blocks of the API this server does not serve, and what a client can do instead
REFUSED_BLOCKS = {
    "image": "images are not served (the models here read text only)",
    "document": "documents are not served; put the text in a text block",
    "search_result": "search results are not served; put the text in a text block",
    "thinking": "extended thinking is not served",
    "redacted_thinking": "extended thinking is not served",
    "server_tool_use": "server tools are not served",
    "web_search_tool_result": "server tools are not served",
    "container_upload": "the code execution container is not served",
}


def _refused(field: str, why: str) -> PydanticCustomError:
    """A 400 that names ``field`` (validation_error_to_api_error reads it from the context)."""
    return PydanticCustomError("invalid_request", "{why}", {"field": field, "why": why})


def _blocks(value: Any, where: str, allowed: tuple[str, ...]) -> list[Block]:
    """Each block of ``value`` (a list of objects) as its model, or a 400 naming its place."""
    out = []
    for j, block in enumerate(value):
        here = f"{where}.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in allowed:
            why = REFUSED_BLOCKS.get(kind) if isinstance(kind, str) else None
            if why is None:
                why = f"a content block here is one of {', '.join(allowed)}; got {kind!r}"
            raise _refused(f"{here}.type", why)
        try:
            out.append(BLOCKS[kind].model_validate(block))
        except ValidationError as exc:
            err = exc.errors()[0]
            raise _refused(".".join(filter(None, [here, field_path(err["loc"])])), err["msg"]) from None
    return out


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "assistant"]
    content: Union[str, list[Any]]


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="ignore")  # cache_control

    type: Optional[Literal["custom"]] = None
    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    input_schema: dict[str, Any]


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self):
        if self.type == "tool" and not self.name:
            raise _refused("tool_choice.name", "tool_choice of type \"tool\" needs the tool's `name`")
        return self


class OutputFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(..., alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: Optional[OutputFormat] = None  # structured output: the answer is JSON of this schema
    effort: Optional[str] = None  # a hint: accepted and ignored


class Metadata(BaseModel):
    model_config = ConfigDict(extra="ignore")

    user_id: Optional[str] = None


# -- requests -------------------------------------------------------------------------------------


class CountTokensRequest(_Body):
    """What count_tokens takes: the conversation and its tools, as a Messages request has them."""

    model: str = Field(..., min_length=1, description="an alias from configuration.yaml")
    messages: list[InputMessage] = Field(..., min_length=1)
    system: Union[str, list[Any], None] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[ToolChoice] = None
    # features this server does not serve: a request that asks for them gets a 400 naming them
    thinking: Optional[dict[str, Any]] = None
    mcp_servers: Any = None
    container: Any = None

    # parsed by the validator below (private: no client field can set them)
    _system: list[TextBlock] = PrivateAttr(default_factory=list)
    _turns: list[tuple[str, list[Block]]] = PrivateAttr(default_factory=list)
    _tools: list[ToolDef] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _parse(self):
        if self.thinking is not None and self.thinking.get("type") != "disabled":
            raise _refused("thinking", "extended thinking is not served here; leave `thinking` out or send "
                           "{\"type\": \"disabled\"}")
        for name, what in (("mcp_servers", "MCP servers"), ("container", "code execution containers")):
            if getattr(self, name) is not None:
                raise _refused(name, f"{what} are not served here")
        if isinstance(self.system, str):
            self._system = [TextBlock(type="text", text=self.system)] if self.system else []
        elif self.system is not None:
            self._system = _blocks(self.system, "system", ("text",))
        for i, m in enumerate(self.messages):
            where = f"messages.{i}.content"
            if isinstance(m.content, str):
                self._turns.append((m.role, [TextBlock(type="text", text=m.content)]))
                continue
            allowed = ("text", "tool_result") if m.role == "user" else ("text", "tool_use")
            blocks = _blocks(m.content, where, allowed)
            for j, b in enumerate(blocks):
                if isinstance(b, ToolResultBlock) and not isinstance(b.content, str):
                    _blocks(b.content, f"{where}.{j}.content", ("text",))
            self._turns.append((m.role, blocks))
        for i, tool in enumerate(self.tools or ()):
            kind = tool.get("type")
            if kind not in (None, "custom"):
                raise _refused(f"tools.{i}.type", f"server tools ({kind}) are not served here; give client tools "
                               "with a name and an input_schema")
            try:
                self._tools.append(ToolDef.model_validate(tool))
            except ValidationError as exc:
                err = exc.errors()[0]
                raise _refused(".".join(filter(None, [f"tools.{i}", field_path(err["loc"])])), err["msg"]) from None
        if self.tool_choice is not None and self.tool_choice.type in ("any", "tool") and not self._tools:
            raise _refused("tool_choice", f"tool_choice {self.tool_choice.type!r} needs `tools`")
        if self.tool_choice is not None and self.tool_choice.type == "tool":
            if self.tool_choice.name not in {t.name for t in self._tools}:
                raise _refused("tool_choice.name", f"tool_choice names {self.tool_choice.name!r}, which is not "
                               "among `tools`")
        return self

    def system_text(self) -> str:
        return BLOCK_SEPARATOR.join(b.text for b in self._system)

    def turns(self) -> list[tuple[str, list[Block]]]:
        return self._turns

    def tool_defs(self) -> list[ToolDef]:
        return self._tools


class MessagesRequest(CountTokensRequest):
    # Anthropic requires max_tokens; StrictInt: `true` is not 1, "10" is not 10
    max_tokens: StrictInt = Field(..., ge=1)
    # Anthropic sets no number; each one costs a scan of the text held back per token
    stop_sequences: Optional[list[Annotated[str, Field(min_length=1)]]] = Field(None, max_length=MAX_STOP_SEQUENCES)
    temperature: Optional[float] = Field(None, ge=0.0, le=1.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[StrictInt] = Field(None, ge=0)
    stream: bool = False
    metadata: Optional[Metadata] = None
    output_config: Optional[OutputConfig] = None
    # hints, accepted and ignored (as are cache_control, speed, inference_geo and other unknown fields)
    service_tier: Optional[str] = None

