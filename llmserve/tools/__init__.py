"""Tool calling in the model's own format.

A chat request meets its alias's call format (formats.py) once, through ``ChatTools``: the
format renders the conversation and ``tools=`` for the chat template (the alias's
``chat_template`` or the model's own), builds the grammar for tool_choice "required" / a
named function, and parses the answer, streamed (parser.CallParser) or whole. The format is
the alias's ``tool_parser``, else detected from the template.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

from backends import errors as engine_errors
from backends.grammar import CallGrammar

from ..config import PROJECT_ROOT, ModelConfig
from ..errors import InvalidRequest
from ..schemas import ChatCompletionRequest, Tool
from .formats import FORMATS, ToolFormat, detect
from .parser import Arguments, CallParser, CallStart, Content, parse_whole

__all__ = ["ChatTools", "FORMATS", "Arguments", "CallStart", "Content", "template_text", "check_tools"]


def active(req: ChatCompletionRequest) -> list[Tool]:
    """The tools the model may call in this request (none for tool_choice "none")."""
    return [] if not req.tools or req.tool_choice == "none" else req.tools


@functools.lru_cache(maxsize=64)
def template_text(spec: Optional[str]) -> Optional[str]:
    """An alias's ``chat_template``: inline Jinja text, or a file (relative to the project)."""
    if spec is None or "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = PROJECT_ROOT / path
    return path.read_text()


def check_tools(req: ChatCompletionRequest) -> None:
    """A 400 naming the field for a function whose parameters are not a JSON schema."""
    import jsonschema

    for i, tool in enumerate(req.tools or ()):
        params = tool.function.parameters
        try:
            jsonschema.validators.validator_for(params).check_schema(params)
            if params.get("type", "object") != "object":
                raise jsonschema.SchemaError("the parameters of a function must be an object schema")
        except Exception as exc:  # SchemaError, or a $schema the library cannot even look up
            why = exc.message if isinstance(exc, jsonschema.SchemaError) else f"{type(exc).__name__}: {exc}"
            raise InvalidRequest(f"tools.{i}.function.parameters is not a valid JSON schema: {why}",
                                 param=f"tools.{i}.function.parameters") from None


class ChatTools:
    """One chat request's side of tool calling, once its model is known."""

    def __init__(self, req: ChatCompletionRequest, config: Optional[ModelConfig]):
        check_tools(req)
        self.req = req
        self.tools = active(req)
        self.names = frozenset(t.function.name for t in self.tools)  # what a bare JSON call may name
        self.template = template_text(config.chat_template) if config else None
        self.parser_name = config.tool_parser if config else None
        self.format: ToolFormat = FORMATS["json"]

    async def encode(self, backend, generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation through the chat template, with the tools, ending with
        the assistant turn's opening unless ``generation_prompt`` is false (tokenize's
        add_generation_prompt; a continued final message keeps its turn's opening)."""
        self.format = FORMATS[self.parser_name] if self.parser_name else detect(self.template or backend.chat_template())
        messages, tools = self.format.render(self.req, self.tools)
        self.prompt_chars = sum(len(m.get("content") or "") for m in messages)
        try:
            return await self._encode(backend, messages, tools, generation_prompt)
        except (InvalidRequest, engine_errors.BadInput):
            # a template that forbids a system role: the system text goes into the first user turn
            if not (self.tools and messages[0]["role"] == "system" and len(messages) > 1
                    and messages[1]["role"] == "user"):
                raise
            first = {**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
            return await self._encode(backend, [first, *messages[2:]], tools, generation_prompt)

    async def _encode(self, backend, messages, tools, generation_prompt):
        if self.req.continue_final_message:
            # the turns before, up to the assistant's opening, then the prefill's own tokens: the
            # model writes on from there (templates differ in how they close a last assistant turn)
            *messages, last = messages
            head = await self._encode_turns(backend, messages, tools)
            return head + await backend.encode_text(last.get("content") or "", special=False)
        return await self._encode_turns(backend, messages, tools, generation_prompt)

    async def _encode_turns(self, backend, messages, tools, generation_prompt=True):
        if tools is None and self.template is None and generation_prompt:  # engines of one's own may take messages only
            return await backend.encode_chat(messages)
        return await backend.encode_chat(messages, tools=tools, template=self.template,
                                         generation_prompt=generation_prompt)

    def grammar(self) -> Optional[CallGrammar]:
        return self.format.grammar(self.req, self.tools) if self.tools else None

    def parser(self) -> Optional[CallParser]:
        """A stream's parser; None when no call can come (no tools, tool_choice "none")."""
        return CallParser(self.format.syntax, self.req.parallel_tool_calls, self.names) if self.tools else None

    def parse(self, text: str) -> tuple[Optional[str], list[dict]]:
        """(content, tool_calls) of a whole answer."""
        if not self.tools:
            return text, []
        return parse_whole(self.format.syntax, text, self.req.parallel_tool_calls, self.names)
