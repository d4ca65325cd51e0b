"""Reads tool calls out of generated text, a chunk at a time.

One state machine serves every call format (a ``Syntax`` says how a format's calls look) and
both paths: a stream feeds it each delta and sends what comes out at once, a whole answer is
fed in one piece. So the arguments a stream sends in fragments join to exactly the arguments
of the same answer unstreamed.

Content passes through as it comes. Only three things wait: text that may be the beginning
of a call marker (until it is told apart); in a format without a marker, a JSON object where a
call may start (the reply's beginning, or right after a call, as vLLM's llama3_json parser
reads them) until its name says whether it is one of the request's functions; and whitespace
(until text follows it: whitespace just before a call, or at the end of an answer that made
one, is dropped, as peers trim it). Inside a call the name is sent when it is complete, then
the arguments as the model writes them, character for character. Text that waited and turns
out to be no call (a call region without one, an object naming no declared function, an
answer cut off before a name was whole) comes out as content, as it was written: an answer
that makes no call streams exactly its text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Collection, Optional, Union

WS = " \t\r\n"


@dataclass(frozen=True)
class Syntax:
    """How one format writes calls.

    ``start``: the literal that opens a call region (consumed), or "" when a call is a bare JSON
    object that opens with ``{"name"`` at the start of the reply or right after another call.
    ``end``: the literal that closes a region (Hermes' ``</tool_call>``); None when the region
    closes with its JSON value. ``call_depth``: the JSON depth at which call objects open (1
    inside Mistral's list). ``args_keys``: the key that holds the arguments.
    """

    start: str
    end: Optional[str]
    call_depth: int
    args_keys: tuple[str, ...]
    separator: str = ""  # one character between bare JSON calls (Llama 3's ";"): dropped
    lead: str = ""  # bare calls: a literal the first may follow (Llama 3's "<|python_tag|>"): dropped


@dataclass
class Content:
    text: str


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class Arguments:
    index: int
    text: str


Event = Union[Content, CallStart, Arguments]


@dataclass
class _Call:
    key: str = ""
    name_raw: str = ""
    name: Optional[str] = None
    held_args: list[str] = field(default_factory=list)  # arguments written before the name
    args_string: str = ""  # arguments written as a JSON string: its text, until it closes
    args_seen: bool = False
    index: int = -1  # the index sent to the client; -1 while not started (or dropped)


_KEY, _IN_KEY, _COLON, _VALUE, _IN_VALUE, _AFTER_VALUE = range(6)


class CallParser:
    """Content and calls out of one answer: ``feed`` each piece of text as it comes, ``finish``
    at the end; both return the events to send (neighbours of one kind joined).

    ``names``: the request's functions (None: any name). In a format without a call marker a
    JSON object is a call only when it names one of them; otherwise it is what the reply is
    about (``{"name": "Tom", "species": "cat"}``). With a marker the model has said it calls.
    """

    def __init__(self, syntax: Syntax, parallel: bool = True, names: Optional[Collection[str]] = None):
        self.syntax = syntax
        self.parallel = parallel
        self.names = None if names is None else frozenset(names)
        self.calls = 0  # calls started (sent)
        self._region = False
        self._after_call = False  # a region just ended (a separator may follow)
        self._may_open = True  # bare calls: one may open here (the reply's start, or after a call)
        self._raw: Optional[str] = None  # a region's text while no call in it is decided
        self._held = ""  # content mode: a possible marker start, or whitespace
        self._wrapper = ""  # region text outside call objects (where the end literal shows)
        self._depth = 0
        self._opened = False  # the region's JSON value has begun
        self._in_str = self._esc = False
        self._call: Optional[_Call] = None
        self._state = _KEY
        self._value_kind = ""  # "{" / "[" / '"' / "s" (scalar) for the value being read
        self._out: list[Event] = []

    # -- public -----------------------------------------------------------------------------
    def feed(self, text: str) -> list[Event]:
        while text:
            text = self._scan_region(text) if self._region else self._scan_content(text)
        out, self._out = self._out, []
        return _merged(out)

    def finish(self) -> list[Event]:
        """The end of the answer: a marker prefix that never completed, or a region cut off
        before its call was decided, is content after all."""
        if self._region and self._raw is not None:
            self._release()
        if not self._region:
            self._content(self._held.rstrip(WS) if self.calls else self._held)
        self._held = ""
        out, self._out = self._out, []
        return _merged(out)

    # -- content mode ---------------------------------------------------------------------
    def _scan_content(self, text: str) -> str:
        """Sends content; returns the text that follows a call marker (for the region)."""
        buf = self._held + text
        self._held = ""
        if not self.syntax.start:
            return self._scan_bare(buf)
        start = self.syntax.start
        cut, whole = self._find_marker(buf)
        body = buf[:cut].rstrip(WS)
        self._content(body)
        if whole:
            self._enter_region(buf[len(body):cut + len(start)])
            return buf[cut + len(start):]
        self._held = buf[len(body):]
        return ""

    def _find_marker(self, buf: str) -> tuple[int, bool]:
        """(where a marker or a possible marker starts, whether it is a whole one); len(buf)
        and False when nothing in ``buf`` can begin one."""
        start = self.syntax.start
        at = buf.find(start)
        if at >= 0:
            return at, True
        for k in range(min(len(start) - 1, len(buf)), 0, -1):
            if start.startswith(buf[-k:]):
                return len(buf) - k, False
        return len(buf), False

    def _scan_bare(self, buf: str) -> str:
        """Content of a format whose calls are bare JSON objects: one opens a call only where a
        call may start (after whitespace, and the lead or separator literal); anywhere else
        ``{"name": ...`` is text like any other."""
        if not self._may_open:
            body = buf.rstrip(WS)
            self._content(body)
            self._held = buf[len(body):]
            return ""
        literal = self.syntax.separator if self._after_call else self.syntax.lead
        at = len(buf) - len(buf.lstrip(WS))
        if literal and buf.startswith(literal, at):
            at += len(literal)
            at += len(buf[at:]) - len(buf[at:].lstrip(WS))
        elif literal and literal.startswith(buf[at:]):
            self._held = buf  # whitespace, or the literal's beginning
            return ""
        opens = _opens_call(buf[at:])
        if opens is None:
            self._held = buf
            return ""
        self._may_open = self._after_call = False
        if not opens:
            return buf  # text: content from here on
        self._enter_region(buf[:at])
        return buf[at:]

    def _content(self, text: str) -> None:
        if text:
            self._out.append(Content(text))

    # -- call regions -----------------------------------------------------------------------
    def _enter_region(self, raw: str) -> None:
        """``raw``: the text that opened it (whitespace before it, its marker), content again
        if no call comes of it."""
        self._region, self._wrapper, self._depth, self._opened = True, "", 0, False
        self._in_str = self._esc = False
        self._call = None
        self._raw = raw

    def _close_region(self) -> None:
        if self._raw is not None:  # it ended without deciding a call
            self._release()
            return
        self._region = False
        self._after_call = self._may_open = True

    def _release(self) -> None:
        """The region is no call after all: its text so far is content, and what follows is."""
        self._content(self._raw or "")
        self._raw = None
        self._region = self._may_open = self._after_call = False
        self._call = None

    def _scan_region(self, text: str) -> str:
        """Reads call objects; returns the text after the region's end (content again)."""
        syntax = self.syntax
        for pos, ch in enumerate(text):
            if self._raw is not None:
                self._raw += ch
            call = self._call
            if call is not None:
                self._call_char(call, ch)
                if not self._region:  # an object that is no call: the rest is text
                    return text[pos + 1:]
                if self._call is None and syntax.end is None and self._depth == 0:
                    self._close_region()
                    return text[pos + 1:]
                continue
            # between call objects: wrappers, list brackets, separators
            if self._in_str:  # a string outside a call (no format here writes one): skipped
                self._string_char(ch)
                continue
            if ch == "{" and self._depth == syntax.call_depth:
                self._depth += 1
                self._opened = True
                self._call, self._state = _Call(), _KEY
                continue
            if syntax.end is None and not self._opened and ch not in WS + "[":
                self._raw = self._raw[:-1]  # no JSON value after the marker: content after all
                self._release()
                return text[pos:]
            if ch in "{[":
                self._depth += 1
                self._opened = True
            elif ch in "}]":
                self._depth = max(0, self._depth - 1)
            elif ch == '"':
                self._in_str = True
            if syntax.end is None:
                if self._opened and self._depth == 0:
                    self._close_region()
                    return text[pos + 1:]
            else:
                self._wrapper = (self._wrapper + ch)[-len(syntax.end):]
                if self._wrapper == syntax.end:
                    self._close_region()
                    return text[pos + 1:]
        return ""

    def _string_char(self, ch: str) -> None:
        if self._esc:
            self._esc = False
        elif ch == "\\":
            self._esc = True
        elif ch == '"':
            self._in_str = False

    def _call_char(self, call: _Call, ch: str) -> None:
        """One character inside a call object (at object level or inside a value)."""
        state = self._state
        if state == _IN_VALUE:
            self._value_char(call, ch)
            return
        if state == _IN_KEY:
            self._string_char(ch)
            if self._in_str:
                call.key += ch
            else:
                self._state = _COLON
            return
        if ch in WS:
            return
        if state in (_KEY, _AFTER_VALUE):
            if ch == '"' and state == _KEY:
                call.key, self._state, self._in_str = "", _IN_KEY, True
            elif ch == ",":
                self._state = _KEY
            elif ch == "}":
                self._end_call(call)
            return
        if state == _COLON:
            if ch == ":":
                self._state = _VALUE
            elif self._raw is not None and not self.syntax.start:
                self._release()  # {"name" and then no JSON: text
            return
        # _VALUE: the first character of a value
        self._state = _IN_VALUE
        self._value_kind = ch if ch in '{["' else "s"
        if ch in "{[":
            self._depth += 1
        elif ch == '"':
            self._in_str = True
        if call.key in self.syntax.args_keys:
            call.args_seen = True
        self._emit_value(call, ch)

    def _value_char(self, call: _Call, ch: str) -> None:
        kind = self._value_kind
        level = self.syntax.call_depth + 1  # the call object's own depth
        if self._in_str:
            self._string_char(ch)
            self._emit_value(call, ch)
            if not self._in_str and kind == '"' and self._depth == level:
                self._value_done(call)
            return
        if kind == "s" and (ch in WS or ch in ",}"):
            self._value_done(call)
            self._call_char(call, ch)  # the delimiter belongs to the object
            return
        if ch == '"':
            self._in_str = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
        self._emit_value(call, ch)
        if kind in "{[" and self._depth == level:
            self._value_done(call)

    def _emit_value(self, call: _Call, ch: str) -> None:
        if call.key == "name":
            call.name_raw += ch
        elif call.key in self.syntax.args_keys:
            if self._value_kind == '"':
                call.args_string += ch
            else:
                self._arguments(call, ch)

    def _arguments(self, call: _Call, text: str) -> None:
        if call.index >= 0:
            self._out.append(Arguments(call.index, text))
        else:
            call.held_args.append(text)

    def _value_done(self, call: _Call) -> None:
        self._state = _AFTER_VALUE
        if call.key in self.syntax.args_keys and self._value_kind == '"':
            # "arguments": "{\"city\": ...}": the JSON inside the string, sent once it closes
            # (vLLM's hermes parser decodes such a string too, streamed or not)
            try:
                self._arguments(call, json.loads(call.args_string, strict=False))
            except ValueError:  # cannot be, the string closed; sent as written, the answer checks it
                self._arguments(call, call.args_string)
        if call.key == "name" and call.name is None:
            try:
                name = json.loads(call.name_raw)
            except ValueError:
                name = None
            bare = not self.syntax.start
            if isinstance(name, str) and (not bare or self.names is None or name in self.names):
                call.name = name
                self._raw = None  # decided: a call (sent, or dropped past the first when not parallel)
                self._start(call)
            elif bare:
                self._release()  # no function of the request's: the object is text

    def _start(self, call: _Call) -> None:
        if self.calls and not self.parallel:
            return  # parallel_tool_calls false: the first call only
        call.index = self.calls
        self.calls += 1
        self._out.append(CallStart(call.index, f"call_{uuid.uuid4().hex[:24]}", call.name))
        if call.held_args:
            self._out.append(Arguments(call.index, "".join(call.held_args)))
            call.held_args = []

    def _end_call(self, call: _Call) -> None:
        self._depth -= 1
        self._call = None
        if call.index >= 0 and not call.args_seen:
            self._out.append(Arguments(call.index, "{}"))


def _merged(events: list[Event]) -> list[Event]:
    """Neighbouring pieces of the same kind joined (one chunk each, not one per character)."""
    out: list[Event] = []
    for e in events:
        last = out[-1] if out else None
        if isinstance(e, Content) and isinstance(last, Content):
            last.text += e.text
        elif isinstance(e, Arguments) and isinstance(last, Arguments) and last.index == e.index:
            last.text += e.text
        else:
            out.append(e)
    return out


def _opens_call(text: str) -> Optional[bool]:
    """Whether ``text`` begins a bare call object (``{"name"``); None while it cannot tell."""
    if not text:
        return None
    if text[0] != "{":
        return False
    rest = text[1:].lstrip(WS)
    if rest.startswith('"name"'):
        return True
    return None if '"name"'.startswith(rest) else False


def parse_whole(syntax: Syntax, text: str, parallel: bool = True,
                names: Optional[Collection[str]] = None) -> tuple[Optional[str], list[dict]]:
    """(content, tool_calls) of a complete answer, by the same machine a stream runs through.

    An answer without a call is its whole text. Calls whose arguments are not a JSON object
    leave the whole answer as content (so does vLLM): a client never gets arguments that do
    not parse.
    """
    parser = CallParser(syntax, parallel, names)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    calls: dict[int, dict] = {}
    for e in events:
        if isinstance(e, CallStart):
            calls[e.index] = {"id": e.id, "type": "function", "function": {"name": e.name, "arguments": ""}}
        elif isinstance(e, Arguments):
            calls[e.index]["function"]["arguments"] += e.text
    if not calls:
        return text, []
    for call in calls.values():
        try:
            ok = isinstance(json.loads(call["function"]["arguments"]), dict)
        except ValueError:
            ok = False
        if not ok:
            return text, []
    return content or None, list(calls.values())
