"""The one interface every engine implements, and the pieces they share."""

from __future__ import annotations

import abc
import asyncio
import codecs
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional

from .config import ModelConfig

CHAT, COMPLETION, EMBEDDINGS = "chat", "completion", "embeddings"


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    ignore_eos: bool = False


@dataclass
class Delta:
    """One step of a generation: new text, and the completion tokens so far."""

    text: str
    completion_tokens: int
    finish_reason: Optional[str] = None  # "stop" or "length" on the last step


@dataclass
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


class Backend(abc.ABC):
    """load / unload / encode / generate / embed / describe for one alias."""

    name: str = ""

    def __init__(self, alias: str, config: ModelConfig):
        self.alias = alias
        self.config = config

    # -- lifecycle ------------------------------------------------------------------
    @abc.abstractmethod
    async def load(self) -> None: ...

    @abc.abstractmethod
    async def unload(self) -> None: ...

    # -- what it can do ---------------------------------------------------------------
    @abc.abstractmethod
    def capabilities(self) -> set[str]: ...

    @abc.abstractmethod
    def context_length(self) -> int: ...

    @abc.abstractmethod
    def running_requests(self) -> int:
        """Requests the engine itself is working on now (not the HTTP layer's count)."""

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "capabilities": sorted(self.capabilities()),
            "context_length": self.context_length(),
            "running_requests": self.running_requests(),
        }

    # -- prompts ----------------------------------------------------------------------
    @abc.abstractmethod
    async def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the conversation rendered by the model's own chat template."""

    @abc.abstractmethod
    async def encode_text(self, text: str) -> list[int]:
        """Token ids of a plain completion prompt (with BOS where the model wants one)."""

    # -- work -------------------------------------------------------------------------
    @abc.abstractmethod
    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Stream the completion. The last Delta carries finish_reason.

        Closing the iterator early (client gone, stop sequence found) must stop the
        engine's work on this request.
        """

    async def embed(self, inputs: list[str]) -> Embeddings:
        raise NotImplementedError


def template_error(exc: Exception):
    """A chat template refusing the messages (e.g. roles out of order) is the client's 400."""
    from .errors import InvalidRequest

    return InvalidRequest(f"The model's chat template rejected these messages: {exc}", param="messages")


def hf_chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation through a Hugging Face tokenizer's chat template."""
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:
        raise template_error(exc) from exc
    # the template already wrote any special tokens (BOS) the model wants
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def release_memory() -> None:
    """After an unload: collect the model's objects and hand freed heap back to the OS
    (glibc keeps freed arenas otherwise, and the process would not shrink)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a character.

    ``decode`` is the engine's ``ids -> str``; decoding a short window around the new
    tokens (the trick vLLM uses) keeps the cost per token constant.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # start of the window
        self._read = 0  # ids up to here have been turned into text

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

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to send now, whether a stop sequence was hit)."""
        if not self.stops:
            return text, False
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self._pending = self._pending[:cut], ""
            return out, True
        keep = min(self._hold, len(self._pending))
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


async def with_stops(deltas: AsyncIterator[Delta], stops: list[str]) -> AsyncIterator[Delta]:
    """Cuts a generation at the first stop sequence (finish_reason "stop").

    Leaving the loop closes ``deltas``, which stops the engine's work.
    """
    if not stops:
        async for d in deltas:
            yield d
        return
    scanner = StopScanner(stops)
    try:
        async for d in deltas:
            text, hit = scanner.feed(d.text)
            if hit:
                yield Delta(text, d.completion_tokens, "stop")
                return
            if d.finish_reason:
                yield Delta(text + scanner.flush(), d.completion_tokens, d.finish_reason)
                return
            if text:
                yield Delta(text, d.completion_tokens)
    finally:
        await deltas.aclose()


_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class EngineThread:
    """One dedicated thread per model for engines whose objects are not thread-safe.

    Every call into the engine goes through this thread, one at a time, so the event
    loop never blocks and two requests never touch the engine at once.
    """

    def __init__(self, name: str):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self.active = 0  # generations queued or running on the thread

    def _count(self, n: int) -> None:
        with self._lock:
            self.active += n

    async def call(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def stream(self, produce: Callable[[Callable[[Any], None], Callable[[], bool]], None]):
        """Runs ``produce(emit, cancelled)`` on the thread and yields what it emits.

        When the consumer stops early, ``cancelled()`` turns true and the producer
        must return at its next step.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(item):
            if not cancel.is_set():
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def run():
            try:
                produce(emit, cancel.is_set)
                emit(_END)
            except BaseException as exc:  # handed to the consumer
                emit(_Failure(exc))
            finally:
                self._count(-1)

        self._count(1)
        future = loop.run_in_executor(self._executor, run)
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            cancel.set()
            del future  # the thread finishes at its next step; later calls queue behind it

    def shutdown(self):
        self._executor.shutdown(wait=True)
