"""The OpenAI encoder of answers: the choices of a chat or text completion, whole or as
stream chunks, and the Server-Sent Events that carry them. One encoder for every path: the
plain one-choice stream takes its per-token bytes from the same chunk this writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import orjson
from backends.base import Delta, TokenLogprob

from .. import tools

# stands for a token's text in the chunk a plain stream encodes once (Shape.token_template)
_TEXT_SLOT = "\x00text\x00"


@dataclass
class Shape:
    """How the choices of one request are written: chat or text, tool calls, logprobs, echo.

    Choice ``i`` of a request with several prompts (completions) is prompt ``i // n``'s choice
    ``i % n``, as OpenAI numbers them; ``echoes`` holds each choice's echoed prompt."""

    chat: bool
    calls: Optional[tools.ChatTools]  # a chat request's tools: an answer may hold calls
    logprobs: bool
    echo: bool = False  # completions: each choice starts with its prompt (set_prompts gives them)
    echoes: list[str] = field(default_factory=list)  # per choice
    prompt_logprobs: bool = False  # echo with logprobs: the prompt's tokens open each choice's logprobs
    output: bool = True  # False for max_tokens 0: the one token the engine made is not shown
    offsets: list[int] = field(default_factory=list)  # per choice: text_offset of the next token

    def set_prompts(self, texts: list[str], n: int) -> None:
        """The prompts' texts, once encoded (``n`` choices each): what echo writes."""
        self.echoes = [t for t in texts for _ in range(n)] if self.echo else []
        self.offsets = [len(e) for e in self.echoes] if self.echo else [0] * (len(texts) * n)

    def plain(self) -> bool:
        return not (self.calls and self.calls.tools) and not self.logprobs and not self.echo and self.output

    def parser(self) -> Optional[tools.CallParser]:
        return self.calls.parser() if self.calls else None

    def echoed(self, i: int) -> str:
        return self.echoes[i] if self.echoes else ""

    # -- whole answers ----------------------------------------------------------------------
    def choice(self, i: int, text: str, finish: str, logprobs: list[TokenLogprob],
               prompt_logprobs: Optional[list] = None, stop: Optional[str] = None) -> dict[str, Any]:
        if not self.output:
            text, logprobs = "", []
        # stop_reason, as vLLM writes it: the stop sequence that ended the choice, else null
        c: dict[str, Any] = {"index": i, "finish_reason": finish, "stop_reason": stop, "logprobs": None}
        if not self.chat:
            c["text"] = self.echoed(i) + text
            c["logprobs"] = self._text_logprobs(i, logprobs, prompt_logprobs, 0 if self.prompt_logprobs else None)
            return c
        c["logprobs"] = self._chat_logprobs(logprobs)
        content, calls = self.calls.parse(text) if self.calls else (text, [])
        if calls:
            c["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
            if finish == "stop":
                c["finish_reason"] = "tool_calls"
        else:
            c["message"] = {"role": "assistant", "content": text}
        return c

    # -- stream chunks ----------------------------------------------------------------------
    def first_chunk(self, i: int) -> Optional[dict[str, Any]]:
        if self.chat:
            return {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
        if self.echo and not self.prompt_logprobs:  # else it comes with the prompt's logprobs
            return {"index": i, "text": self.echoed(i), "finish_reason": None, "logprobs": None}
        return None

    def token_template(self, meta: dict[str, Any]) -> tuple[str, str]:
        """The SSE bytes before and after a token's JSON text in a plain stream's token chunk:
        encoded once per stream, so each token costs one string's encoding."""
        chunk = {**meta, "choices": [self._piece(0, _TEXT_SLOT, None)]}
        head, _, tail = sse_event(chunk).partition(json.dumps(_TEXT_SLOT))
        return head, tail

    def chunks(self, i: int, d: Delta) -> list[dict[str, Any]]:
        """The chunks of one delta: the echoed prompt with its logprobs (first delta, echo with
        logprobs), its text and logprobs, then, on the last, the finish reason in a chunk of its
        own with an empty delta (as OpenAI sends it)."""
        out = []
        if self.prompt_logprobs and d.prompt_logprobs is not None:
            out.append({"index": i, "text": self.echoed(i), "finish_reason": None,
                        "logprobs": self._text_logprobs(i, [], d.prompt_logprobs, 0)})
        if self.output and (d.text or d.logprobs or not d.finish_reason):
            out.append(self._piece(i, d.text, self._logprobs(i, d.logprobs or [])))
        if d.finish_reason:
            out.append(self.finish_chunk(i, d.finish_reason, d.stop_sequence))
        return out

    def finish_chunk(self, i: int, finish: str, stop: Optional[str] = None) -> dict[str, Any]:
        if self.chat:
            return {"index": i, "delta": {}, "finish_reason": finish, "stop_reason": stop, "logprobs": None}
        return {"index": i, "text": "", "finish_reason": finish, "stop_reason": stop, "logprobs": None}

    def call_chunks(self, i: int, d: Delta, parser: tools.CallParser) -> list[dict[str, Any]]:
        """The chunks of one step of an answer that may call tools: content, a call's id and
        name, pieces of its arguments; the finish reason "tool_calls" once a call was made."""
        events = parser.feed(d.text) + (parser.finish() if d.finish_reason else [])
        out = [{"index": i, "delta": _call_delta(e), "finish_reason": None, "logprobs": None} for e in events]
        if self.logprobs and d.logprobs:
            if not out:
                out.append({"index": i, "delta": {}, "finish_reason": None, "logprobs": None})
            out[0]["logprobs"] = self._chat_logprobs(d.logprobs)
        if d.finish_reason:
            finish = "tool_calls" if d.finish_reason == "stop" and parser.calls else d.finish_reason
            out.append(self.finish_chunk(i, finish, d.stop_sequence))
        return out

    def _piece(self, i: int, text: str, logprobs: Optional[dict[str, Any]]) -> dict[str, Any]:
        if self.chat:
            return {"index": i, "delta": {"content": text} if text else {}, "finish_reason": None,
                    "logprobs": logprobs}
        return {"index": i, "text": text, "finish_reason": None, "logprobs": logprobs}

    # -- logprobs -----------------------------------------------------------------------------
    def _logprobs(self, i: int, entries: list[TokenLogprob]) -> Optional[dict[str, Any]]:
        return self._chat_logprobs(entries) if self.chat else self._text_logprobs(i, entries)

    def _chat_logprobs(self, entries: list[TokenLogprob]) -> Optional[dict[str, Any]]:
        if not self.logprobs:
            return None
        return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
                             "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, b, lp in e.top]}
                            for e in entries]}

    def _text_logprobs(self, i: int, entries: list[TokenLogprob], prompt: Optional[list] = None,
                       start: Optional[int] = None) -> Optional[dict[str, Any]]:
        """The completions (legacy) shape. ``text_offset`` runs on across a choice's chunks
        (``offsets``); ``start`` restarts it (a whole answer, or the echoed prompt)."""
        if not self.logprobs:
            return None
        if start is not None:
            self.offsets[i:i + 1] = [start]
        tokens, values, tops, offsets = [], [], [], []
        at = self.offsets[i] if self.offsets else 0
        for e in [*(prompt or ()), *entries]:
            offsets.append(at)
            if e is None:  # the prompt's first token: nothing comes before it, so no logprob
                first = self._first_token_text(i, prompt)
                tokens.append(first)
                values.append(None)
                tops.append(None)
                at += len(first)
                continue
            tokens.append(e.token)
            values.append(e.logprob)
            tops.append({t: lp for t, _, lp in e.top})
            at += len(e.token)
        if self.offsets:
            self.offsets[i] = at
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _first_token_text(self, i: int, prompt: list) -> str:
        """The text of the prompt's first token, which engines send no entry for: what the echoed
        prompt holds before the other tokens' text ("" for a BOS, which has none)."""
        echo, rest = self.echoed(i), "".join(e.token for e in prompt[1:] if e is not None)
        return echo[:len(echo) - len(rest)] if echo.endswith(rest) else ""


def _call_delta(e) -> dict[str, Any]:
    if isinstance(e, tools.Content):
        return {"content": e.text}
    if isinstance(e, tools.CallStart):
        return {"tool_calls": [{"index": e.index, "id": e.id, "type": "function",
                                "function": {"name": e.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]}


async def read_chat_stream(events: AsyncIterator[str]) -> AsyncIterator[tuple[str, Any]]:
    """A chat stream's SSE events read back, for the fronts built on it (Responses, Anthropic):
    ("text", piece), ("call", a tool-call delta), ("finish", the choice that ends), ("usage", the
    usage chunk's), ("error", the error body sent after the first byte). Parsed with orjson: this
    runs once per token."""
    async for sse in events:
        if not sse.startswith("data: {"):
            continue  # data: [DONE]
        chunk = orjson.loads(sse[6:])
        if "error" in chunk:
            yield "error", chunk["error"]
            continue
        if chunk.get("usage"):
            yield "usage", chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if delta.get("content"):
                yield "text", delta["content"]
            for call in delta.get("tool_calls") or ():
                yield "call", call
            if choice["finish_reason"]:
                yield "finish", choice


def json_text(text: str) -> str:
    """A string as JSON, the same characters json.dumps(ensure_ascii=False) writes, by orjson
    (a fifth of the time; it refuses lone surrogates, which json.dumps passes through)."""
    try:
        return orjson.dumps(text).decode()
    except TypeError:
        return json.dumps(text, ensure_ascii=False)


def sse_event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def cached_tokens(usage: dict[str, Any]) -> int:
    """The cached prompt tokens of a chat usage object (see usage)."""
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``cached``: prompt tokens the engine's prefix cache held."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}

