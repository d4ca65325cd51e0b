"""The call formats: one object per model family that renders the tools for the chat template,
builds the grammar for tool_choice "required" / a named function, and parses the output.

- ``hermes``: Hermes / Qwen, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  (vLLM's ``hermes`` parser, llama.cpp's Hermes 2 Pro format).
- ``llama3_json``: Llama 3.1 / 3.2 JSON calls, ``{"name": ..., "parameters": {...}}``, several
  joined by ``;``, opening the reply (after ``<|python_tag|>`` or not; vLLM's ``llama3_json``).
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (vLLM's ``mistral``,
  the v3 tokenizer's form).
- ``json``: for chat templates that know no tools (the shipped SmolLM2): the tools are
  described in a system message, a call is a bare ``{"name": ..., "arguments": {...}}`` object
  that opens the reply, earlier calls and tool results are written as plain assistant / user
  turns.

The two bare formats have no call marker: an object there is a call only where the reply
begins (or right after another call) and only when it names one of the request's functions;
any other JSON in a reply is content.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from backends.grammar import CallGrammar
from ..errors import InvalidRequest
from ..schemas import ChatCompletionRequest, NamedToolChoice, Tool
from .parser import Syntax


class ToolFormat:
    name = ""
    syntax: Syntax
    args_key = "arguments"
    # the grammar's text around the calls: begin call (separator call)* end
    begin, separator, end = "", "", ""
    parallel = True  # the grammar may allow several calls

    # -- rendering ------------------------------------------------------------------------
    def render(self, req: ChatCompletionRequest, tools: list[Tool]) -> tuple[list[dict], Optional[list[dict]]]:
        """The messages and tools= the chat template gets, in the shape Hugging Face
        templates expect (assistant ``tool_calls`` with arguments as objects, ``role: tool``
        messages with ``tool_call_id`` and the function's ``name``, a participant's ``name``
        on the others, developer messages as system ones)."""
        messages = []
        for i, m in enumerate(req.messages):
            message: dict[str, Any] = {"role": template_role(m.role), "content": m.text(), **participant(m)}
            if m.tool_calls:
                message["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.function.name,
                                  "arguments": arguments(c.function.arguments, f"messages.{i}.tool_calls.{k}")}}
                    for k, c in enumerate(m.tool_calls)]
            if m.role == "tool":
                message["tool_call_id"] = m.tool_call_id
                message["name"] = called_function(req, i)
            messages.append(message)
        return messages, [t.model_dump(exclude_none=True) for t in tools] or None

    # -- grammar --------------------------------------------------------------------------
    def call_schema(self, tool: Tool) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"name": {"const": tool.function.name}, self.args_key: tool.function.parameters},
            "required": ["name", self.args_key],
            "additionalProperties": False,
        }

    def grammar(self, req: ChatCompletionRequest, tools: list[Tool]) -> Optional[CallGrammar]:
        """The calls the output must be for "required" or a named function, else None."""
        if isinstance(req.tool_choice, NamedToolChoice):
            chosen = [t for t in tools if t.function.name == req.tool_choice.function.name]
        elif req.tool_choice == "required":
            chosen = tools
        else:
            return None
        return CallGrammar(self.begin, tuple(self.call_schema(t) for t in chosen), self.separator, self.end,
                           repeat=self.parallel and req.parallel_tool_calls
                           and not isinstance(req.tool_choice, NamedToolChoice))


class Hermes(ToolFormat):
    name = "hermes"
    syntax = Syntax("<tool_call>", "</tool_call>", 0, ("arguments",))
    begin, separator, end = "<tool_call>\n", "\n</tool_call>\n<tool_call>\n", "\n</tool_call>"


class Llama3Json(ToolFormat):
    name = "llama3_json"
    args_key = "parameters"
    # vLLM's parser takes "arguments" too, and a reply that opens with <|python_tag|>
    syntax = Syntax("", None, 0, ("parameters", "arguments"), separator=";", lead="<|python_tag|>")
    separator = "; "


class Mistral(ToolFormat):
    name = "mistral"
    syntax = Syntax("[TOOL_CALLS]", None, 1, ("arguments",))
    begin, separator, end = "[TOOL_CALLS][", ", ", "]"


class GenericJson(ToolFormat):
    name = "json"
    parallel = False  # its prompt asks for one JSON object
    syntax = Syntax("", None, 0, ("arguments",))
    PROMPT = ("You can call these functions:\n{functions}\n"
              'To call one, answer with only a JSON object: {{"name": <function name>, "arguments": '
              "<its arguments as JSON>}}.")

    def render(self, req, tools):
        messages: list[dict[str, Any]] = []
        for i, m in enumerate(req.messages):
            if m.role == "tool":
                called_function(req, i)
                result = f"Result of call {m.tool_call_id}: {m.text()}"
                if messages and messages[-1].get("tool_results"):  # results in a row: one user turn
                    messages[-1]["content"] += "\n" + result
                else:
                    messages.append({"role": "user", "content": result, "tool_results": True})
            elif m.tool_calls:
                calls = [{"name": c.function.name,
                          "arguments": arguments(c.function.arguments, f"messages.{i}.tool_calls.{k}")}
                         for k, c in enumerate(m.tool_calls)]
                text = "\n".join(json.dumps(c) for c in calls)
                messages.append({"role": "assistant", "content": (m.text() + "\n" + text) if m.text() else text,
                                 **participant(m)})
            else:
                messages.append({"role": template_role(m.role), "content": m.text(), **participant(m)})
        for m in messages:
            m.pop("tool_results", None)
        if tools:
            functions = "\n".join(json.dumps(t.function.model_dump(exclude_none=True)) for t in tools)
            prompt = self.PROMPT.format(functions=functions)
            if messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + prompt}
            else:
                messages.insert(0, {"role": "system", "content": prompt})
        return messages, None


FORMATS: dict[str, ToolFormat] = {f.name: f for f in (Hermes(), Llama3Json(), Mistral(), GenericJson())}


def detect(template: Optional[str]) -> ToolFormat:
    """The format a chat template writes calls in, from its own text (as llama.cpp's server
    picks its parser); templates that know no tools get the generic JSON format."""
    t = template or ""
    if "tools" not in t:
        return FORMATS["json"]
    if "<tool_call>" in t:
        return FORMATS["hermes"]
    if "[TOOL_CALLS]" in t:
        return FORMATS["mistral"]
    if "<|python_tag|>" in t or '"parameters"' in t or "ipython" in t:
        return FORMATS["llama3_json"]
    return FORMATS["json"]


def template_role(role: str) -> str:
    """OpenAI's developer role is the system role to a chat template (templates know no other)."""
    return "system" if role == "developer" else role


def participant(m) -> dict[str, str]:
    """A message's participant ``name`` for the template (Hugging Face templates that know it
    read ``message.name``, vLLM passes it on); a tool message's name is the called function's."""
    return {"name": m.name} if m.name and m.role != "tool" else {}


def arguments(text: str, where: str) -> Any:
    try:
        return json.loads(text or "{}")
    except ValueError:
        raise InvalidRequest(f"{where}.function.arguments is not valid JSON: {text[:80]!r}",
                             param=f"{where}.function.arguments") from None


def called_function(req: ChatCompletionRequest, i: int) -> str:
    """The name of the earlier call the tool message at ``i`` answers; a 400 when none matches."""
    wanted = req.messages[i].tool_call_id
    for m in req.messages[:i]:
        for c in m.tool_calls or ():
            if c.id == wanted:
                return c.function.name
    raise InvalidRequest(f"messages.{i}.tool_call_id {wanted!r} answers no tool call of an earlier assistant message.",
                         param=f"messages.{i}.tool_call_id")
