"""Text pieces every engine shares: incremental detokenizing, stop sequences across chunk
borders, chat templates through a Hugging Face tokenizer, and logprob entries."""

from __future__ import annotations

import codecs
import functools
import re
from typing import AsyncIterator, Callable, Optional

from .base import ADMITTED, Delta, TokenLogprob
from .errors import BadInput


def template_error(exc: Exception):
    """A chat template refusing the messages (e.g. roles out of order) is the client's 400."""
    return BadInput(f"The model's chat template rejected these messages: {exc}", param="messages")


def hf_chat_ids(tokenizer, messages: list[dict], tools: Optional[list[dict]] = None,
                template: Optional[str] = None, generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation through a Hugging Face tokenizer's chat template (or the
    alias's own ``template``), with ``tools`` given to the template."""
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template,
                                             add_generation_prompt=generation_prompt, tokenize=False)
    except Exception as exc:
        raise template_error(exc) from exc
    # the template already wrote any special tokens (BOS) the model wants
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def top_logprobs(logprobs, k: int, token: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """The TokenLogprob of ``token`` from one position's log-probabilities (a numpy vector)."""
    import numpy as np

    top = []
    if k:
        best = np.argpartition(-logprobs, k)[:k]
        top = [logprob_entry(int(t), logprobs[t], piece) for t in best[np.argsort(-logprobs[best])]]
    text, data, lp = logprob_entry(token, logprobs[token], piece)
    return TokenLogprob(text, data, lp, top)


def logprob_entry(token: int, logprob: float, piece: Callable[[int], bytes]) -> tuple[str, list[int], float]:
    """One (text, bytes, logprob) entry, as TokenLogprob.top holds them; ``piece`` gives a token's bytes."""
    data = piece(token)
    return data.decode("utf-8", errors="replace"), list(data), float(logprob)


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def hf_token_bytes(tokenizer, token: int) -> bytes:
    """The bytes of one token of a Hugging Face tokenizer. A token holding part of a UTF-8
    character decodes to U+FFFD, so its bytes are read from the token itself: SentencePiece's
    byte fallback (``<0xE2>``) or GPT-2's byte-level alphabet (``Ġ`` for a space)."""
    text = tokenizer.decode([token])
    if "\ufffd" not in text:
        return text.encode("utf-8")
    piece = tokenizer.convert_ids_to_tokens(token)
    if match := _BYTE_FALLBACK.fullmatch(piece):
        return bytes([int(match.group(1), 16)])
    byte_of = _gpt2_byte_decoder()
    if all(c in byte_of for c in piece):
        return bytes(byte_of[c] for c in piece)
    return text.encode("utf-8")


@functools.cache
def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (transformers' bytes_to_unicode, reversed)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def log_softmax(logits):
    """Log-probabilities of float32 numpy logits along their last axis (one vector, or a row per
    position), each at least -9999 (OpenAI's floor), so that NaN or infinite logits still give
    numbers JSON can carry. The input is not changed (llama.cpp owns its logits buffer)."""
    import numpy as np

    out = np.nan_to_num(logits, nan=-np.inf, posinf=np.finfo(np.float32).max)  # a copy
    top = out.max(axis=-1, keepdims=True)
    dead = ~np.isfinite(top)  # every logit -inf: nothing is likelier than anything else
    top[dead] = 0.0
    out -= top
    with np.errstate(divide="ignore", invalid="ignore"):
        out -= np.log(np.exp(out).sum(axis=-1, keepdims=True))
    np.maximum(out, -9999.0, out=out)
    out[np.broadcast_to(dead, out.shape)] = -9999.0
    return out


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a character.

    ``decode`` is the engine's ``ids -> str``; decoding a short window around the new
    tokens (the trick vLLM uses) keeps the cost per token constant. The window starts on the
    last few ``prompt`` tokens, as vLLM's does: decoded alone, a first token loses its
    leading space with SentencePiece tokenizers ("▁Paris" -> "Paris").
    """

    PROMPT_CONTEXT = 5  # vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET

    def __init__(self, decode: Callable[[list[int]], str], prompt: list[int] = ()):
        self._decode = decode
        self.ids: list[int] = list(prompt[-self.PROMPT_CONTEXT:]) if self.PROMPT_CONTEXT else []
        self._prefix = 0  # start of the window
        self._read = len(self.ids)  # ids up to here have been turned into text

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return full_text[len(prefix_text) :]
        return ""


class ByteDetokenizer:
    """For engines that give bytes per token (llama.cpp): UTF-8 decoded incrementally."""

    def __init__(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, data: bytes) -> str:
        return self._utf8.decode(data)


class StopScanner:
    """Finds stop sequences across chunk borders; holds back text that may start one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""

    def feed(self, text: str) -> tuple[str, Optional[str]]:
        """Returns (text safe to send now, the stop sequence hit, if one was)."""
        if not self.stops:
            return text, None
        self._pending += text
        found = [(i, s) for s, i in ((s, self._pending.find(s)) for s in self.stops) if i >= 0]
        if found:
            cut, stop = min(found, key=lambda f: f[0])  # the earliest; of two at one place, the first listed
            out, self._pending = self._pending[:cut], ""
            return out, stop
        keep = min(self._hold, len(self._pending))
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out) :]
        return out, None

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


def with_stops(deltas: AsyncIterator[Delta], stops: list[str]) -> AsyncIterator[Delta]:
    """Cuts a generation at the first stop sequence (finish_reason "stop"); without stop
    sequences, ``deltas`` itself (no generator layer per token).

    Leaving the loop closes ``deltas``, which stops the engine's work.
    """
    return _cut_at_stops(deltas, stops) if stops else deltas


async def _cut_at_stops(deltas: AsyncIterator[Delta], stops: list[str]) -> AsyncIterator[Delta]:
    scanner = StopScanner(stops)
    try:
        async for d in deltas:
            if d is ADMITTED:
                yield d
                continue
            text, hit = scanner.feed(d.text)
            if hit is not None:
                yield Delta(text, d.completion_tokens, "stop", d.logprobs, d.prompt_logprobs, hit)
                return
            if d.finish_reason:
                yield Delta(text + scanner.flush(), d.completion_tokens, d.finish_reason, d.logprobs,
                            d.prompt_logprobs, d.stop_sequence)  # an engine that stops on its own says which
                return
            if text or d.logprobs or d.prompt_logprobs:
                yield Delta(text, d.completion_tokens, None, d.logprobs, d.prompt_logprobs)
    finally:
        await deltas.aclose()
