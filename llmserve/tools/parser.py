"""Reads tool calls out of generated text, a chunk at a time.

One state machine serves every call format (a ``Syntax`` says how a format's calls look) and
both paths: a stream feeds it each delta and sends what comes out at once, a whole answer is
fed in one piece. So the arguments a stream sends in fragments join to exactly the arguments
of the same answer unstreamed.

Content passes through as it comes. Only two things wait: text that may be the beginning of
a call marker (until it is told apart), and whitespace (until text follows it: whitespace
just before a call or at the end is dropped, as peers trim it). Inside a call the name is sent
when it is complete, then the arguments as the model writes them, character for character.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Optional, Union

WS = " \t\r\n"


@dataclass(frozen=True)
class Syntax:
    """How one format writes calls.

    ``start``: the literal that opens a call region (consumed), or "" when a call is a bare JSON
    object that opens with ``{"name"``. ``end``: the literal that closes a region (Hermes'
    ``</tool_call>``); None when the region closes with its JSON value. ``call_depth``: the JSON
    depth at which call objects open (1 inside Mistral's list). ``args_keys``: the key that
    holds the arguments.
    """

    start: str
    end: Optional[str]
    call_depth: int
    args_keys: tuple[str, ...]
    separator: str = ""  # one character between bare JSON calls (Llama 3's ";"): dropped


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
    args_seen: bool = False
    index: int = -1  # the index sent to the client; -1 while not started (or dropped)


_KEY, _IN_KEY, _COLON, _VALUE, _IN_VALUE, _AFTER_VALUE = range(6)


class CallParser:
    """Content and calls out of one answer: ``feed`` each piece of text as it comes, ``finish``
    at the end; both return the events to send (neighbours of one kind joined)."""

    def __init__(self, syntax: Syntax, parallel: bool = True):
        self.syntax = syntax
        self.parallel = parallel
        self.calls = 0  # calls started (sent)
        self._region = False
        self._after_call = False  # a region just ended (a separator may follow)
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
        """The end of the answer: a marker prefix that never completed is content after all."""
        if not self._region:
            self._content(self._held.rstrip(WS))
        self._held = ""
        out, self._out = self._out, []
        return _merged(out)

    # -- content mode ---------------------------------------------------------------------
    def _scan_content(self, text: str) -> str:
        """Sends content; returns the text that follows a call marker (for the region)."""
        buf = self._held + text
        self._held = ""
        if self._after_call and self.syntax.separator:
            rest = buf.lstrip(WS)
            if not rest:
                self._held = buf
                return ""
            self._after_call = False
            if rest.startswith(self.syntax.separator):
                buf = rest[len(self.syntax.separator):].lstrip(WS)
        cut, whole = self._find_marker(buf)
        if whole:
            self._content(buf[:cut].rstrip(WS))
            self._enter_region()
            return buf[cut + len(self.syntax.start):] if self.syntax.start else buf[cut:]
        body = buf[:cut].rstrip(WS)
        self._content(body)
        self._held = buf[len(body):]
        return ""

    def _find_marker(self, buf: str) -> tuple[int, bool]:
        """(where a marker or a possible marker starts, whether it is a whole one); len(buf)
        and False when nothing in ``buf`` can begin one."""
        start = self.syntax.start
        if start:
            at = buf.find(start)
            if at >= 0:
                return at, True
            for k in range(min(len(start) - 1, len(buf)), 0, -1):
                if start.startswith(buf[-k:]):
                    return len(buf) - k, False
            return len(buf), False
        at = buf.find("{")
        while at >= 0:
            rest = buf[at + 1:].lstrip(WS)
            if rest.startswith('"name"'):
                return at, True
            if '"name"'.startswith(rest):
                return at, False
            at = buf.find("{", at + 1)
        return len(buf), False

    def _content(self, text: str) -> None:
        if text:
            self._out.append(Content(text))

    # -- call regions -----------------------------------------------------------------------
    def _enter_region(self) -> None:
        self._region, self._wrapper, self._depth, self._opened = True, "", 0, False
        self._in_str = self._esc = False
        self._call = None

    def _scan_region(self, text: str) -> str:
        """Reads call objects; returns the text after the region's end (content again)."""
        syntax = self.syntax
        for pos, ch in enumerate(text):
            call = self._call
            if call is not None:
                self._call_char(call, ch)
                if self._call is None and syntax.end is None and self._depth == 0:
                    self._region, self._after_call = False, True
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
                self._region = False  # no JSON value after the marker: content after all
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
                    self._region = False
                    return text[pos + 1:]
            else:
                self._wrapper = (self._wrapper + ch)[-len(syntax.end):]
                if self._wrapper == syntax.end:
                    self._region = False
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
            if call.index >= 0:
                self._out.append(Arguments(call.index, ch))
            else:
                call.held_args.append(ch)

    def _value_done(self, call: _Call) -> None:
        self._state = _AFTER_VALUE
        if call.key == "name" and call.name is None:
            try:
                name = json.loads(call.name_raw)
            except ValueError:
                name = None
            if isinstance(name, str):
                call.name = name
                self._start(call)

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


def parse_whole(syntax: Syntax, text: str, parallel: bool = True) -> tuple[Optional[str], list[dict]]:
    """(content, tool_calls) of a complete answer, by the same machine a stream runs through.

    Calls whose arguments are not a JSON object leave the whole answer as content (so does
    vLLM): a client never gets arguments that do not parse.
    """
    parser = CallParser(syntax, parallel)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    calls: dict[int, dict] = {}
    for e in events:
        if isinstance(e, CallStart):
            calls[e.index] = {"id": e.id, "type": "function", "function": {"name": e.name, "arguments": ""}}
        elif isinstance(e, Arguments):
            calls[e.index]["function"]["arguments"] += e.text
    for call in calls.values():
        try:
            ok = isinstance(json.loads(call["function"]["arguments"]), dict)
        except ValueError:
            ok = False
        if not ok:
            return text, []
    return content or None, list(calls.values())
