"""The Responses API (/v1/responses): a second front on the chat operation, not a copy of it.

A request's input items become chat messages and its function tools chat tools, and
ChatServing.chat (serving/chat.py) runs them exactly as /v1/chat/completions
would: the same prompt rendering, tool format, constraints, limits and errors. Its answer
becomes output items; a streamed answer's chunks (the same deltas the chat stream sends)
become Responses events, each with its sequence_number. Client mistakes are the chat path's
APIErrors with ``param`` renamed to the Responses field, raised before the first byte.
Stored responses (llmserve/response_store.py) keep the conversation that led to them, so
``previous_response_id`` continues it, across restarts too.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Union

from pydantic import ValidationError

from ..config import Settings
from ..errors import APIError, InvalidRequest, validation_error_to_api_error
from . import OpenAIOperations
from .chunks import cached_tokens, read_chat_stream
from .generation import EventStream
from ..response_store import ResponseStore, default_path
from ..responses_schemas import (FunctionCallItem, FunctionCallOutputItem, FunctionTool, InputItem, MessageItem,
                                ResponsesRequest, parse_items, parse_tools)
from ..schemas import ChatCompletionRequest

log = logging.getLogger("llmserve")

# `include` values that ask for nothing this server produces (it makes no reasoning items)
HARMLESS_INCLUDES = {"reasoning.encrypted_content"}
# chat fields named in the chat path's errors -> the Responses field they came from
_CHAT_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
                "response_format": "text.format", "tool_choice": "tool_choice", "parallel_tool_calls":
                "parallel_tool_calls"}


class ResponsesOperations:
    def __init__(self, chat: OpenAIOperations, settings: Settings):
        self.chat = chat
        cfg = settings.responses
        path = Path(cfg.store_path).expanduser() if cfg.store_path else default_path()
        self.store = ResponseStore(path, cfg.max_stored, cfg.max_age_days * 86400)

    async def create(self, req: ResponsesRequest) -> Union[dict[str, Any], AsyncIterator[str]]:
        alias = req.model or self.chat.settings.default_model
        _refuse_unsupported(req, alias)
        tools = parse_tools(req.tools or [])
        new_items = parse_items([{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input)
        history: list[InputItem] = []
        if req.previous_response_id:
            stored = await self.store.get(req.previous_response_id)
            if stored is None:
                raise InvalidRequest(f"Previous response with id {req.previous_response_id!r} not found (never "
                                     "stored, deleted, or past the store's bounds).", param="previous_response_id",
                                     code="previous_response_not_found")
            # a call cut short (max_output_tokens, a failure) may hold half its arguments: not replayed
            output = [i for i in stored.response["output"]
                      if i["type"] != "function_call" or i["status"] == "completed"]
            history = parse_items(stored.conversation + output, "previous_response_id")
        items = history + new_items
        chat_req = _chat_request(req, alias, tools, _messages(req.instructions, items, len(history)))
        run = Run(req, alias, tools, [i.model_dump(by_alias=True) for i in items])
        result = await self.chat.chat_for(chat_req, _renamed)
        if not isinstance(result, dict):  # EventStream: its release runs even if the events never start
            return EventStream(self._stream(run, result), result.release)
        choice = result["choices"][0]
        output = OutputItems(EventWriter())  # the same items a stream builds; the events are not sent
        if choice["message"].get("content"):  # as in a stream, where empty pieces send nothing
            output.text(choice["message"]["content"])
        for k, call in enumerate(choice["message"].get("tool_calls") or ()):
            output.call({"index": k, **call})
        output.close(choice["finish_reason"])
        usage = result["usage"]
        response = run.response(output.status(choice["finish_reason"]), output.items, _usage(usage))
        await self._keep(run, response)
        return response

    async def retrieve(self, response_id: str) -> dict[str, Any]:
        stored = await self.store.get(response_id)
        if stored is None:
            raise _not_found(response_id)
        return stored.response

    async def input_items(self, response_id: str, limit: int = 20, order: str = "desc",
                          after: Optional[str] = None) -> dict[str, Any]:
        """The input items that led to a stored response (the whole conversation the model saw,
        earlier turns of a previous_response_id chain included), as OpenAI lists them: newest
        first unless ``order`` is "asc", ``limit`` per page, the next page ``after`` an item id."""
        stored = await self.store.get(response_id)
        if stored is None:
            raise _not_found(response_id)
        items = [_listed_item(response_id, i, item) for i, item in enumerate(stored.conversation)]
        if order == "desc":
            items.reverse()
        if after is not None:
            at = next((k for k, item in enumerate(items) if item["id"] == after), None)
            if at is None:
                raise InvalidRequest(f"after: no input item {after!r} in response {response_id!r}.", param="after",
                                     code="invalid_value")
            items = items[at + 1:]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    async def delete(self, response_id: str) -> dict[str, Any]:
        if not await self.store.delete(response_id):
            raise _not_found(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    def close(self) -> None:
        self.store.close()

    async def _keep(self, run: "Run", response: dict[str, Any]) -> None:
        if run.req.store is False:
            return
        try:
            await self.store.put(response, run.conversation)
        except Exception:  # noqa: BLE001 - the answer is complete; only its continuation is lost
            log.exception("storing response %s in %s failed", response["id"], self.store.path)

    async def _stream(self, run: "Run", chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """The chat stream's chunks as Responses events (Server-Sent Events with ``event:``
        lines, as OpenAI sends them; no ``[DONE]``)."""
        w = EventWriter()
        output = OutputItems(w)
        usage: dict[str, Any] = {"prompt_tokens": 0, "completion_tokens": 0}
        finish, error = None, None
        reader = read_chat_stream(chunks)
        try:
            yield w.event("response.created", response=run.response("in_progress", [], None))
            yield w.event("response.in_progress", response=run.response("in_progress", [], None))
            async for kind, value in reader:
                if kind == "text":
                    yield output.text(value)
                elif kind == "call":
                    yield output.call(value)
                elif kind == "finish":
                    finish = value["finish_reason"]
                elif kind == "usage":
                    usage = value
                else:
                    error = value
            if error is not None:
                closing = output.close("error")
                if closing:
                    yield closing
                response = run.response("failed", output.items, _usage(usage),
                                        error={"code": error.get("code") or error.get("type"),
                                               "message": error["message"]})
                final = "response.failed"
            else:
                yield output.close(finish)
                status = output.status(finish)
                response = run.response(status, output.items, _usage(usage))
                final = "response.completed" if status == "completed" else "response.incomplete"
            await self._keep(run, response)
            yield w.event(final, response=response)
        finally:
            # runs too when the client goes away: closing the chat stream stops the engine's work
            await reader.aclose()
            await chunks.aclose()


class Run:
    """One request's echo of its settings in every Response object it answers with."""

    def __init__(self, req: ResponsesRequest, alias: str, tools: list[FunctionTool],
                 conversation: list[dict[str, Any]]):
        self.req, self.alias, self.tools, self.conversation = req, alias, tools, conversation
        self.id, self.created = f"resp_{uuid.uuid4().hex}", int(time.time())

    def response(self, status: str, output: list[dict[str, Any]], usage: Optional[dict[str, Any]],
                 error: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        req = self.req
        fmt = req.text.format if req.text and req.text.format else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "background": False,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls, "model": self.alias, "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": req.store is not False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": [t.model_dump() for t in self.tools],
            "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled",
            "usage": usage, "user": req.user, "metadata": req.metadata or {},
        }


class EventWriter:
    """Responses events as Server-Sent Events, numbered in the order they are sent."""

    def __init__(self):
        self.seq = 0

    def event(self, kind: str, **fields: Any) -> str:
        body = json.dumps({"type": kind, **fields, "sequence_number": self.seq}, ensure_ascii=False)
        self.seq += 1
        return f"event: {kind}\ndata: {body}\n\n"

    def text_delta(self, head: str, text: str) -> str:
        """One token's event: the bytes around its text are made once per item (``head``),
        so each token costs one small json.dumps (the per-chunk path is the front end's budget)."""
        out = f'{head}{json.dumps(text, ensure_ascii=False)}, "sequence_number": {self.seq}}}\n\n'
        self.seq += 1
        return out


class OutputItems:
    """The output items of one answer, built from the chat path's deltas (text pieces and tool
    calls by index), with the events that open, fill and close them. The non-streamed answer
    goes through the same steps, so both give the same items."""

    def __init__(self, writer: EventWriter):
        self.w = writer
        self.items: list[dict[str, Any]] = []
        self.open: Optional[dict[str, Any]] = None
        self.text_head, self.pieces = "", []
        self.calls: dict[int, dict[str, Any]] = {}

    def text(self, piece: str) -> str:
        events = ""
        if self.open is None or self.open["type"] != "message":
            events += self._close_open("completed") + self._add({
                "id": f"msg_{uuid.uuid4().hex}", "type": "message", "status": "in_progress", "role": "assistant",
                "content": []})
            events += self.w.event("response.content_part.added", item_id=self.open["id"], output_index=self._index(),
                                   content_index=0, part=_text_part(""))
            self.pieces = []
            self.text_head = ("event: response.output_text.delta\ndata: " + json.dumps(
                {"type": "response.output_text.delta", "item_id": self.open["id"], "output_index": self._index(),
                 "content_index": 0, "logprobs": []})[:-1] + ', "delta": ')
        self.pieces.append(piece)
        return events + self.w.text_delta(self.text_head, piece)

    def call(self, delta: dict[str, Any]) -> str:
        """A chat tool-call delta: the first of an index opens a function_call item, each
        carries a fragment of the arguments."""
        events = ""
        k = delta.get("index", 0)
        fn = delta.get("function") or {}
        if k not in self.calls:
            events += self._close_open("completed") + self._add({
                "id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": "in_progress",
                "call_id": delta.get("id") or f"call_{uuid.uuid4().hex[:24]}", "name": fn.get("name", ""),
                "arguments": ""})
            self.calls[k] = self.open
        item = self.calls[k]
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            events += self.w.event("response.function_call_arguments.delta", item_id=item["id"],
                                   output_index=self.items.index(item), delta=fn["arguments"])
        return events

    def close(self, finish: Optional[str]) -> str:
        """Closes the open item; an answer with no output at all is one empty message."""
        if not self.items and finish != "error":
            self.text("")
        return self._close_open("incomplete" if finish in ("length", "error") else "completed")

    @staticmethod
    def status(finish: Optional[str]) -> str:
        return "incomplete" if finish == "length" else "completed"

    def _index(self) -> int:
        return len(self.items) - 1

    def _add(self, item: dict[str, Any]) -> str:
        self.items.append(item)
        self.open = item
        return self.w.event("response.output_item.added", output_index=self._index(), item=item)

    def _close_open(self, status: str) -> str:
        item, self.open = self.open, None
        if item is None:
            return ""
        index = self.items.index(item)
        item["status"] = status
        if item["type"] == "message":
            text = "".join(self.pieces)
            item["content"] = [_text_part(text)]
            return (self.w.event("response.output_text.done", item_id=item["id"], output_index=index,
                                 content_index=0, text=text, logprobs=[])
                    + self.w.event("response.content_part.done", item_id=item["id"], output_index=index,
                                   content_index=0, part=_text_part(text))
                    + self.w.event("response.output_item.done", output_index=index, item=item))
        return (self.w.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                             name=item["name"], arguments=item["arguments"])
                + self.w.event("response.output_item.done", output_index=index, item=item))


# -- the mapping onto the chat path -------------------------------------------------------------


def _refuse_unsupported(req: ResponsesRequest, alias: str) -> None:
    def refuse(param: str, why: str) -> None:
        raise InvalidRequest(f"`{param}` {why}", param=param, code="unsupported_parameter")

    if req.background:
        refuse("background", "(background: true) is not supported by this server; run the request in the foreground.")
    if req.reasoning is not None and any(v not in (None, "none") for v in req.reasoning.model_dump().values()):
        refuse("reasoning", f"is not supported for {alias!r}: no model on this server has a reasoning mode to set.")
    if req.truncation == "auto":
        refuse("truncation", "\"auto\" is not supported by this server; an input past the context gets a 400.")
    if req.top_logprobs:
        refuse("top_logprobs", "is not supported by the Responses API of this server (the chat route has logprobs).")
    for name in ("conversation", "prompt", "context_management"):
        if getattr(req, name) is not None:
            refuse(name, "is not supported by this server (stored conversations are chained with "
                         "previous_response_id).")
    if req.text is not None and req.text.verbosity not in (None, "medium"):
        refuse("text.verbosity", "is not supported by this server.")
    for value in req.include or ():
        if value not in HARMLESS_INCLUDES:
            refuse("include", f"value {value!r} is not supported by this server (it produces text and function "
                              "calls only).")


def _messages(instructions: Optional[str], items: list[InputItem], history: int) -> list[dict[str, Any]]:
    """Chat messages of the conversation: instructions as the system message, consecutive
    function calls as one assistant message, their outputs as tool messages."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    calls: set[str] = set()
    last = None
    for i, item in enumerate(items):
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            calls.add(item.call_id)
            if isinstance(last, FunctionCallItem):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in calls:
                place = f"input.{i - history}.call_id"
                raise InvalidRequest(f"{place}: no function_call with call_id {item.call_id!r} comes before this "
                                     "output (in the input or the previous response).", param=place,
                                     code="invalid_value")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        last = item
    lead = next((k for k, m in enumerate(messages) if m["role"] not in ("system", "developer")), len(messages))
    if instructions and lead > 1:  # one system message: templates that take one leading system turn refuse two
        messages[:lead] = [{"role": "system", "content": "\n\n".join(m["content"] for m in messages[:lead])}]
    return messages


def _chat_request(req: ResponsesRequest, alias: str, tools: list[FunctionTool],
                  messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    if not messages:
        raise InvalidRequest("`input` is empty: give at least one message.", param="input", code="empty_input")
    body: dict[str, Any] = {"model": alias, "messages": messages, "stream": bool(req.stream),
                            "max_completion_tokens": req.max_output_tokens, "user": req.user,
                            "metadata": req.metadata}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    for name in ("temperature", "top_p", "parallel_tool_calls"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    if tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in tools]
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice, tools)
    fmt = req.text.format if req.text else None
    if fmt is not None:
        body["response_format"] = {"type": fmt.type}
        if fmt.type == "json_schema":
            body["response_format"]["json_schema"] = {"name": fmt.name, "description": fmt.description,
                                                      "schema": fmt.schema_, "strict": fmt.strict}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise _renamed(validation_error_to_api_error(list(exc.errors()))) from None


def _tool_choice(choice: Union[str, dict[str, Any]], tools: list[FunctionTool]) -> Union[str, dict[str, Any]]:
    if isinstance(choice, str):
        if choice == "required" and not tools:
            raise InvalidRequest("tool_choice \"required\" needs function `tools`.", param="tool_choice",
                                 code="invalid_value")
        return choice
    kind = choice.get("type")
    if kind != "function":
        raise InvalidRequest(f"tool_choice.type: {kind!r} is not supported by this server; give \"none\", \"auto\", "
                             "\"required\" or {\"type\": \"function\", \"name\": ...}.", param="tool_choice.type",
                             code="unsupported_value")
    name = choice.get("name")
    if name not in {t.name for t in tools}:
        raise InvalidRequest(f"tool_choice.name: {name!r} is not among the function `tools` of this request.",
                             param="tool_choice.name", code="invalid_value")
    return {"type": "function", "function": {"name": name}}


def _renamed(exc: APIError) -> APIError:
    """The chat path's error, its ``param`` named as the Responses field it came from."""
    if exc.param:
        head, _, rest = exc.param.partition(".")
        if head == "tools":
            exc.param = exc.param.replace(".function.", ".", 1)
        elif head in _CHAT_PARAMS:
            exc.param = _CHAT_PARAMS[head]  # message indexes do not match item indexes: the field alone
    return exc


def _not_found(response_id: str) -> APIError:
    return APIError(f"No response with id {response_id!r} is stored here (stored with store: false, deleted, or "
                    "past the store's bounds).", status=404, param="response_id", code="not_found")


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    details = {"cached_tokens": cached_tokens(usage), "cache_write_tokens": 0}
    return {"input_tokens": prompt, "input_tokens_details": details,
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


_ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def _listed_item(response_id: str, index: int, item: dict[str, Any]) -> dict[str, Any]:
    """A stored input item as OpenAI lists it: with an id (stored items have none: made from the
    response's id and the item's place, so the same item keeps its id), a status, and message
    content as typed parts."""
    kind = item.get("type", "message")
    listed = {**item, "type": kind, "id": f"{_ITEM_PREFIX.get(kind, 'item')}_{response_id[5:]}_{index}",
              "status": "completed"}
    if kind == "message" and isinstance(item.get("content"), str):
        part = "output_text" if item.get("role") == "assistant" else "input_text"
        listed["content"] = [{"type": part, "text": item["content"],
                              **({"annotations": []} if part == "output_text" else {})}]
    elif kind == "message":
        listed["content"] = [{**p, "annotations": p.get("annotations", [])} if p.get("type") == "output_text" else p
                             for p in item["content"]]
    return listed
