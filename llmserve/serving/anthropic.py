"""Anthropic's Messages API (/v1/messages): a third front on the chat operation.

A Messages request becomes a chat request (system text, user / assistant turns, tool_use
blocks as the assistant's tool calls, tool_result blocks as tool messages, client tools as
function tools, tool_choice any / tool as required / named), and ChatServing.chat
(serving/chat.py) runs it as /v1/chat/completions would: the same template, tool format,
grammar, limits and errors. Its answer becomes content blocks; a stream's chunks (the chat
stream's deltas) become Anthropic's events, each with its ``event:`` line. Client mistakes
are the chat path's APIErrors with ``param`` renamed to the Messages field, raised before
the first byte; every error leaves here in Anthropic's shape (``error_body``).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, AsyncIterator, Optional, Union

from pydantic import ValidationError

from ..anthropic_schemas import (BLOCK_SEPARATOR, CountTokensRequest, MessagesRequest, TextBlock, ToolResultBlock,
                                 ToolUseBlock)
from ..errors import APIError, InvalidRequest, validation_error_to_api_error
from ..schemas import ChatCompletionRequest
from . import OpenAIOperations
from .chunks import cached_tokens, json_text, read_chat_stream
from .generation import EventStream

# chat fields named in the chat path's errors -> the Messages field they came from
_CHAT_PARAMS = {"messages": "messages", "stop": "stop_sequences", "max_tokens": "max_tokens",
                "response_format": "output_config.format",
                "tool_choice": "tool_choice", "parallel_tool_calls": "tool_choice.disable_parallel_tool_use"}
# the chat path's finish reasons -> Anthropic's stop_reason
_STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}
# Anthropic's error type for each status it answers with; statuses it does not use map onto its own
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                504: "timeout_error", 529: "overloaded_error"}
_STATUSES = {503: 529, 507: 529}  # busy, loading, no room for the model: Anthropic's "overloaded" (retried)


class AnthropicOperations:
    def __init__(self, ops: OpenAIOperations):
        self.ops = ops

    async def create(self, req: MessagesRequest) -> Union[dict[str, Any], EventStream]:
        chat_req = chat_request(req)
        result = await self.ops.chat_for(chat_req, _renamed)
        run = Run(req.model, req.tool_choice is not None and req.tool_choice.type in ("any", "tool"))
        if not isinstance(result, dict):  # EventStream: its release runs even if the events never start
            return EventStream(self._stream(run, result), result.release)
        choice = result["choices"][0]
        blocks = ContentBlocks()  # the same blocks a stream builds; the events are not sent
        if choice["message"].get("content"):
            blocks.text(choice["message"]["content"])
        for k, call in enumerate(choice["message"].get("tool_calls") or ()):
            blocks.call({"index": k, **call})
        blocks.close()
        usage = result["usage"]
        return run.message(blocks.content, _stop_reason(choice), _stop_sequence(choice),
                           _usage(usage))

    async def count_tokens(self, req: CountTokensRequest) -> dict[str, int]:
        """The prompt's tokens as the same Messages request counts them in its usage."""
        try:
            return {"input_tokens": await self.ops.count_chat_tokens(chat_request(req))}
        except APIError as exc:
            raise _renamed(exc) from exc

    async def _stream(self, run: "Run", chunks: EventStream) -> AsyncIterator[str]:
        """The chat stream's chunks as Anthropic's events: message_start, ping, each block's
        start / deltas / stop, message_delta (stop_reason, usage), message_stop; a failure
        after the first byte is an ``error`` event."""
        blocks = ContentBlocks(live_arguments=run.constrained)
        usage = {"input_tokens": chunks.prompt_tokens, "output_tokens": 0}
        finish: dict[str, Any] = {}
        reader = read_chat_stream(chunks)
        try:
            yield event("message_start", message=run.message([], None, None, dict(usage)))
            yield event("ping")
            async for kind, value in reader:
                if kind == "text":
                    yield blocks.text(value)
                elif kind == "call":
                    yield blocks.call(value)
                elif kind == "finish":
                    finish = value
                elif kind == "usage":
                    usage.update(_usage(value))
                else:  # an error after the first byte
                    if blocks.open is not None:
                        yield blocks.close()
                    yield event("error", error=_stream_error(value))
                    return
            yield blocks.close()
            yield event("message_delta", delta={"stop_reason": _stop_reason(finish),
                                                "stop_sequence": _stop_sequence(finish)}, usage=usage)
            yield event("message_stop")
        finally:
            # runs too when the client goes away: closing the chat stream stops the engine's work
            await reader.aclose()
            await chunks.aclose()


def chat_request(req: CountTokensRequest) -> ChatCompletionRequest:
    """The chat request a Messages request (or a count_tokens one) stands for."""
    messages: list[dict[str, Any]] = []
    if req.system_text():
        messages.append({"role": "system", "content": req.system_text()})
    turns = _merged(req.turns())
    if turns[-1][0] == "assistant" and not turns[-1][1]:
        turns.pop()  # an empty final assistant turn prefills nothing
    for role, blocks in turns:
        text = BLOCK_SEPARATOR.join(b.text for b in blocks if isinstance(b, TextBlock))
        if role == "assistant":
            calls = [{"id": b.id, "type": "function",
                      "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
                     for b in blocks if isinstance(b, ToolUseBlock)]
            messages.append({"role": "assistant", "content": text if text or not calls else None,
                             "tool_calls": calls or None})
            continue
        for b in blocks:  # tool results answer the calls of the turn before: they come first
            if isinstance(b, ToolResultBlock):
                # the error flag has no place in a chat tool message: the model reads it in the text
                messages.append({"role": "tool", "tool_call_id": b.tool_use_id,
                                 "content": f"Error: {b.text()}" if b.is_error else b.text()})
        if text or not any(isinstance(b, ToolResultBlock) for b in blocks):
            messages.append({"role": "user", "content": text})
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    if messages and messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls"):
        if messages[-1]["content"] != messages[-1]["content"].rstrip():
            raise InvalidRequest("messages: the final assistant content (a prefill) must not end with whitespace "
                                 "(as Anthropic refuses it: the model would write on after a space or newline)",
                                 param="messages", code="invalid_value")
        body["continue_final_message"] = True  # a prefill: the answer continues the assistant's text
    tools = req.tool_defs()
    if tools:
        body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                           "parameters": t.input_schema}} for t in tools]
    choice = req.tool_choice
    if choice is not None:
        body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or {
            "type": "function", "function": {"name": choice.name}}
        if choice.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False
    if isinstance(req, MessagesRequest):
        body.update(max_tokens=req.max_tokens, stream=req.stream,
                    temperature=req.temperature, top_p=req.top_p, top_k=req.top_k or None,
                    user=req.metadata.user_id if req.metadata else None)
        if req.stream:
            body["stream_options"] = {"include_usage": True}
        fmt = req.output_config.format if req.output_config else None
        if fmt is not None:  # the same grammar as the chat route's json_schema response_format
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema_}}
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise _renamed(validation_error_to_api_error(list(exc.errors()))) from None
    if isinstance(req, MessagesRequest) and req.stop_sequences:
        chat.stop = req.stop_sequences  # checked by MessagesRequest: Anthropic takes more than the chat route's 4
    return chat


def _merged(turns: list[tuple[str, list]]) -> list[tuple[str, list]]:
    """Consecutive turns of one role as one turn, as Anthropic combines them (chat templates
    that insist on alternating roles would refuse them apart)."""
    out: list[tuple[str, list]] = []
    for role, blocks in turns:
        if out and out[-1][0] == role:
            out[-1] = (role, out[-1][1] + blocks)
        else:
            out.append((role, list(blocks)))
    return out


class Run:
    """One request's message id and model, in its answer and its stream's message_start."""

    def __init__(self, model: str, constrained: bool = False):
        self.model, self.id = model, f"msg_{uuid.uuid4().hex}"
        self.constrained = constrained  # tool_choice any / tool: a grammar holds the calls to their schemas

    def message(self, content: list[dict[str, Any]], stop_reason: Optional[str], stop_sequence: Optional[str],
                usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, **usage}}


def _usage(usage: dict[str, Any]) -> dict[str, int]:
    """Anthropic's usage from the chat path's: input_tokens are the prompt tokens not read from
    the cache, cache_read_input_tokens the rest (their sum is the prompt, as Anthropic counts)."""
    cached = cached_tokens(usage)
    return {"input_tokens": usage["prompt_tokens"] - cached, "output_tokens": usage["completion_tokens"],
            "cache_read_input_tokens": cached}


def event(kind: str, **fields: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n"


class ContentBlocks:
    """The content blocks of one answer, built from the chat path's deltas (text pieces, tool
    calls by index), with the events that open, fill and close them. A whole answer goes
    through the same steps, so both give the same blocks.

    ``live_arguments``: a call's arguments go out as the model writes them. Only where a grammar
    holds them to valid JSON (tool_choice any / tool): the SDK parses every input_json_delta and
    fails on a fragment that is no JSON prefix, which a model writing freely may produce. Else
    they go out in one delta when the call is complete, and only if they are a JSON object."""

    def __init__(self, live_arguments: bool = True):
        self.content: list[dict[str, Any]] = []
        self.open: Optional[dict[str, Any]] = None
        self.live = live_arguments
        self.calls: dict[int, int] = {}  # chat call index -> the index of its tool_use block
        self.arguments: dict[int, str] = {}  # block index -> the JSON text of its input so far
        self.text_head = ""

    def text(self, piece: str) -> str:
        events = ""
        if self.open is None or self.open["type"] != "text":
            events += self._start({"type": "text", "text": ""})
            # the bytes around a token's text, made once per block: each token costs one json.dumps
            self.text_head = ("event: content_block_delta\ndata: " + json.dumps(
                {"type": "content_block_delta", "index": self._index(), "delta": {"type": "text_delta"}})[:-2]
                + ', "text": ')
        self.open["text"] += piece
        return events + f"{self.text_head}{json_text(piece)}}}}}\n\n"

    def call(self, delta: dict[str, Any]) -> str:
        """A chat tool-call delta: the first of an index opens a tool_use block, each carries a
        fragment of its input's JSON as the model writes it."""
        events = ""
        k = delta.get("index", 0)
        fn = delta.get("function") or {}
        if k not in self.calls:
            events += self._start({"type": "tool_use", "id": delta.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                                   "name": fn.get("name", ""), "input": {}})
            self.calls[k] = self._index()
            self.arguments[self._index()] = ""
        if fn.get("arguments"):
            at = self.calls[k]
            self.arguments[at] += fn["arguments"]
            if self.live:
                events += _input_delta(at, fn["arguments"])
        return events

    def close(self) -> str:
        """Closes the open block (a tool_use block's input is its arguments, parsed)."""
        if self.open is None:
            return ""
        at, events = self._index(), ""
        if self.open["type"] == "tool_use":
            self.open["input"] = _input(self.arguments[at])
            if not self.live and self.open["input"]:  # held until complete: sent whole, if an object
                events = _input_delta(at, self.arguments[at])
        self.open = None
        return events + event("content_block_stop", index=at)

    def _index(self) -> int:
        return len(self.content) - 1

    def _start(self, block: dict[str, Any]) -> str:
        events = self.close()
        self.content.append(block)
        self.open = block
        return events + event("content_block_start", index=self._index(), content_block=dict(block))


def _input_delta(at: int, fragment: str) -> str:
    return event("content_block_delta", index=at, delta={"type": "input_json_delta", "partial_json": fragment})


def _input(arguments: str) -> dict[str, Any]:
    """A call's arguments as its input object; arguments cut short (max_tokens) are no object: {}."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _stop_reason(choice: dict[str, Any]) -> Optional[str]:
    finish = choice.get("finish_reason")
    if finish is None:
        return None
    if finish in _STOP_REASONS:
        return _STOP_REASONS[finish]
    return "stop_sequence" if choice.get("stop_reason") else "end_turn"


def _stop_sequence(choice: dict[str, Any]) -> Optional[str]:
    """The stop sequence that ended the answer; Anthropic names it only with stop_reason stop_sequence."""
    return choice.get("stop_reason") if _stop_reason(choice) == "stop_sequence" else None


def _renamed(exc: APIError) -> APIError:
    """The chat path's error, its ``param`` named as the Messages field it came from."""
    if exc.param:
        head, _, rest = exc.param.partition(".")
        if head == "tools":  # tools.0.function.parameters -> tools.0.input_schema
            renamed = exc.param.replace(".function.parameters", ".input_schema").replace(".function.", ".")
            exc.message = exc.message.replace(exc.param, renamed)
            exc.param = renamed
        elif head in _CHAT_PARAMS:
            exc.param = _CHAT_PARAMS[head]  # chat message indexes do not match the turns': the field alone
        exc.message = exc.message.replace("`stop`", "`stop_sequences`").replace("stop:", "stop_sequences:")
    return exc


def error_status(exc: APIError) -> int:
    return _STATUSES.get(exc.status, exc.status)


def error_body(exc: APIError) -> dict[str, Any]:
    """Anthropic's error shape; the field at fault, where known, opens the message."""
    status = error_status(exc)
    kind = _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    message = exc.message
    if exc.param and exc.param not in message:
        message = f"{exc.param}: {message}"
    return {"type": "error", "error": {"type": kind, "message": message}}


def _stream_error(error: dict[str, Any]) -> dict[str, Any]:
    """A chat stream's error event (OpenAI's body: type, code) as Anthropic's error object."""
    if error.get("code") == "queue_timeout":
        kind = "overloaded_error"
    elif error.get("code") == "timeout":
        kind = "timeout_error"
    else:
        kind = {"server_error": "api_error", "invalid_request_error": "invalid_request_error",
                "rate_limit_error": "rate_limit_error"}.get(error.get("type"), "api_error")
    return {"type": kind, "message": error["message"]}

