"""Tool calling in one documented format for every engine.

The tools are described to the model in a system message; a call is the whole answer as
one JSON object {"name": ..., "arguments": {...}} (or a list of them). With tool_choice
"required" or a named function the output is constrained to that shape (the engines'
JSON-schema decoding), so the arguments always parse and validate; with "auto" the model
decides and an answer that is such an object becomes message.tool_calls. Earlier calls and
tool results in the conversation are rendered as plain assistant / user turns, so any chat
template takes them.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Optional

from .errors import InvalidRequest
from .schemas import ChatCompletionRequest, NamedToolChoice, Tool

PROMPT = (
    "You can call these functions:\n{functions}\n"
    'To call one, answer with only a JSON object: {{"name": <function name>, "arguments": <its arguments as JSON>}}.'
)


def active(req: ChatCompletionRequest) -> list[Tool]:
    """The tools the model may call in this request (none for tool_choice "none")."""
    return [] if not req.tools or req.tool_choice == "none" else req.tools


def render(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The conversation as plain role/content messages, with the tools' description."""
    messages = []
    for i, m in enumerate(req.messages):
        if m.role == "tool":
            messages.append({"role": "user", "content": f"Result of call {m.tool_call_id}: {m.text()}"})
        elif m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments, f"messages.{i}.tool_calls.{k}")}
                     for k, c in enumerate(m.tool_calls)]
            messages.append({"role": "assistant", "content": json.dumps(calls[0] if len(calls) == 1 else calls)})
        else:
            messages.append({"role": m.role, "content": m.text()})
    tools = active(req)
    if tools:
        functions = "\n".join(json.dumps(t.function.model_dump(exclude_none=True)) for t in tools)
        prompt = PROMPT.format(functions=functions)
        if messages[0]["role"] in ("system", "developer"):
            messages[0] = {"role": messages[0]["role"], "content": messages[0]["content"] + "\n\n" + prompt}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages


def _arguments(text: str, where: str) -> Any:
    try:
        return json.loads(text or "{}")
    except ValueError:
        raise InvalidRequest(f"{where}.function.arguments is not valid JSON: {text[:80]!r}",
                             param=f"{where}.function.arguments") from None


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": tool.function.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def constraint(req: ChatCompletionRequest) -> Optional[dict[str, Any]]:
    """The JSON schema the output must follow: a call for "required" or a named function,
    else what response_format asks for (None: free text)."""
    tools = active(req)
    if isinstance(req.tool_choice, NamedToolChoice):
        return _call_schema(next(t for t in tools if t.function.name == req.tool_choice.function.name))
    if req.tool_choice == "required":
        return _call_schema(tools[0]) if len(tools) == 1 else {"anyOf": [_call_schema(t) for t in tools]}
    return response_schema(req.response_format)


def response_schema(fmt) -> Optional[dict[str, Any]]:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    return fmt.json_schema.schema_ or {"type": "object"}


def parse(text: str, tools: list[Tool]) -> Optional[list[dict[str, Any]]]:
    """message.tool_calls from an answer that is a call (or a list of calls), else None."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    calls = value if isinstance(value, list) else [value]
    names = {t.function.name for t in tools}
    if not calls or not all(isinstance(c, dict) and c.get("name") in names and isinstance(c.get("arguments"), dict)
                            for c in calls):
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in calls]
