"""The KV of recently prefilled prompts, for the Transformers loop (transformers_backend.BatchLoop):
a request whose prompt starts like one of them copies that part of the keys and values instead
of computing it again, as llama.cpp's slots keep their last prompt's tokens and vLLM's prefix
cache keeps blocks. A shared system prompt, a chat's earlier turns, or few-shot examples are
then prefilled once.

The entries are whole prompts (each layer's keys and values, [1, heads, tokens, dim]) keyed by
their token ids and the LoRA adapter they ran with (an adapter changes the keys and values), held
up to a byte bound, least recently used dropped first. Only positions before the first token
that differs are taken, and never the prompt's last token: its logits are what sampling needs."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional


class PrefixCache:
    def __init__(self, max_bytes: int, min_tokens: int = 16):
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self.bytes = 0
        # (adapter, prompt ids) -> [(keys, values) per layer]
        self._entries: OrderedDict[tuple[Optional[str], tuple[int, ...]], list[tuple[Any, Any]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int], adapter: Optional[str]) -> tuple[int, list[tuple[Any, Any]]]:
        """The longest usable cached prefix of ``prompt``: how many tokens (0: none worth it) and
        each layer's keys and values of them (views into the entry: the caller copies)."""
        best, best_key = 0, None
        limit = len(prompt) - 1  # the last token is fed again, for its logits
        for key in self._entries:
            if key[0] != adapter:
                continue
            n = _common_prefix(key[1], prompt, limit)
            if n > best:
                best, best_key = n, key
        if best < self.min_tokens or best_key is None:
            return 0, []
        self._entries.move_to_end(best_key)
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[best_key]]

    def store(self, prompt: list[int], adapter: Optional[str], layers: list[tuple[Any, Any]]) -> None:
        """Keeps the keys and values of a prompt just prefilled (``layers``: one (keys, values) per
        layer, exactly ``len(prompt)`` positions). A cached prompt that this one extends is
        dropped (this one covers it); one that already covers this one is only refreshed."""
        if len(prompt) < self.min_tokens or self.max_bytes <= 0:
            return
        ids = tuple(prompt)
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if size > self.max_bytes:  # before dropping what it covers: that stays useful
            return
        for key in list(self._entries):
            if key[0] != adapter:
                continue
            old = key[1]
            if len(old) >= len(ids) and old[:len(ids)] == ids:
                self._entries.move_to_end(key)
                return
            if len(old) < len(ids) and ids[:len(old)] == old:
                self._drop(key)
        self._entries[(adapter, ids)] = layers
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def clear(self, adapter: Optional[str] = None) -> None:
        """Forgets every entry (of one adapter, when given: it was unloaded)."""
        for key in [k for k in self._entries if adapter is None or k[0] == adapter]:
            self._drop(key)

    def _drop(self, key) -> None:
        layers = self._entries.pop(key)
        self.bytes -= sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


def _common_prefix(a: tuple[int, ...], b: list[int], limit: int) -> int:
    n = min(len(a), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
