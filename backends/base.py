"""The one interface every engine implements, and the pieces they share."""

from __future__ import annotations

import abc
import asyncio
import codecs
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from llmserve.config import ModelConfig
from .grammar import CallGrammar

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
    logprobs: Optional[int] = None  # None: no logprobs; k: each token's logprob and the k most likely
    presence_penalty: float = 0.0  # OpenAI's: minus this for every token already generated
    frequency_penalty: float = 0.0  # minus this times how often the token was generated
    repetition_penalty: float = 1.0  # vLLM / Hugging Face's: divides the logits of tokens seen
    min_p: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    json_schema: Optional[dict] = None  # the output is constrained to JSON valid under this schema
    tool_grammar: Optional[CallGrammar] = None  # or to tool calls in the model's format (tool_choice)

    def features(self) -> set[str]:
        """The request fields these parameters use beyond plain sampling (see Backend.features)."""
        used = {
            "logprobs": self.logprobs is not None,
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "repetition_penalty": self.repetition_penalty != 1,
            "min_p": self.min_p > 0,
            "logit_bias": bool(self.logit_bias),
            "response_format": self.json_schema is not None,
            "tool_choice": self.tool_grammar is not None,
        }
        return {name for name, on in used.items() if on}


@dataclass
class TokenLogprob:
    """One generated token: its text, bytes and log-probability, and the most likely tokens
    at that position (the model's distribution before sampling settings)."""

    token: str
    bytes: list[int]
    logprob: float
    top: list[tuple[str, list[int], float]] = field(default_factory=list)


@dataclass
class Delta:
    """One step of a generation: new text, and the completion tokens so far."""

    text: str
    completion_tokens: int
    finish_reason: Optional[str] = None  # "stop" or "length" on the last step
    logprobs: Optional[list[TokenLogprob]] = None  # the tokens of this step, when asked for


@dataclass
class Embeddings:
    vectors: list[list[float]]
    tokens: list[int]  # prompt tokens of each input

    @property
    def prompt_tokens(self) -> int:
        return sum(self.tokens)


class Backend(abc.ABC):
    """load / unload / encode / generate / embed / describe for one alias."""

    name: str = ""
    # request fields beyond plain sampling that generate() honours (SamplingParams.features);
    # a request using any other gets a 400 naming the field and the engine
    features: frozenset[str] = frozenset()

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

    def failure(self) -> Optional[str]:
        """Why the engine can no longer serve (its process died), or None while it can."""
        return None

    def vocab_size(self) -> Optional[int]:
        """Token ids run from 0 to this (checks logit_bias); None when unknown."""
        return None

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
    async def encode_chat(self, messages: list[dict], tools: Optional[list[dict]] = None,
                          template: Optional[str] = None) -> list[int]:
        """Token ids of the conversation rendered by the chat template (``template``, else the
        model's own) with ``tools=`` (OpenAI's tool objects) where given."""

    def chat_template(self) -> Optional[str]:
        """The model's own chat template (its text), None when it has none."""
        return None

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
    from llmserve.errors import InvalidRequest

    return InvalidRequest(f"The model's chat template rejected these messages: {exc}", param="messages")


def hf_chat_ids(tokenizer, messages: list[dict], tools: Optional[list[dict]] = None,
                template: Optional[str] = None) -> list[int]:
    """Token ids of a conversation through a Hugging Face tokenizer's chat template."""
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template,
                                             add_generation_prompt=True, tokenize=False)
    except Exception as exc:
        raise template_error(exc) from exc
    # the template already wrote any special tokens (BOS) the model wants
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def top_logprobs(logprobs, k: int, token: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """The TokenLogprob of ``token`` from one position's log-probabilities (a numpy vector)."""
    import numpy as np

    def entry(t: int) -> tuple[str, list[int], float]:
        data = piece(t)
        return data.decode("utf-8", errors="replace"), list(data), float(logprobs[t])

    top = []
    if k:
        best = np.argpartition(-logprobs, k)[:k]
        top = [entry(int(t)) for t in best[np.argsort(-logprobs[best])]]
    text, data, lp = entry(token)
    return TokenLogprob(text, data, lp, top)


def log_softmax(logits):
    """Log-probabilities of a float32 numpy logits vector."""
    import numpy as np

    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


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
            text, hit = scanner.feed(d.text)
            if hit:
                yield Delta(text, d.completion_tokens, "stop", d.logprobs)
                return
            if d.finish_reason:
                yield Delta(text + scanner.flush(), d.completion_tokens, d.finish_reason, d.logprobs)
                return
            if text or d.logprobs:
                yield Delta(text, d.completion_tokens, None, d.logprobs)
    finally:
        await deltas.aclose()


class EmbeddingBatcher:
    """Joins concurrent embedding requests to one model into one forward pass.

    While the engine computes one batch, the requests that arrive wait and then go in
    together (up to ``max_inputs``), so a lone request never waits for a window and a busy
    model batches by itself. A batch that fails is retried request by request, so one bad
    input fails only the request that sent it.
    """

    def __init__(self, run: Callable[[list[str]], Awaitable[Embeddings]], max_inputs: int = 256):
        self._run, self._max = run, max_inputs
        self._queue: list[tuple[list[str], asyncio.Future]] = []
        self._draining = False
        self.batches = 0  # forward passes so far (for tests and describe)
        self.running = 0  # requests waiting for or in a forward pass

    async def embed(self, inputs: list[str]) -> Embeddings:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((inputs, future))
        if not self._draining:
            self._draining = True
            asyncio.ensure_future(self._drain())
        self.running += 1
        try:
            return await future
        finally:
            self.running -= 1

    async def _drain(self) -> None:
        try:
            while self._queue:
                group, size = [], 0
                while self._queue and (not group or size + len(self._queue[0][0]) <= self._max):
                    inputs, future = self._queue.pop(0)
                    if not future.done():  # a client that left is skipped
                        group.append((inputs, future))
                        size += len(inputs)
                if group:
                    await self._run_group(group)
        finally:
            self._draining = False

    async def _run_group(self, group) -> None:
        self.batches += 1
        try:
            result = await self._run([text for inputs, _ in group for text in inputs])
        except BaseException as exc:
            if len(group) == 1:
                if not group[0][1].done():
                    group[0][1].set_exception(exc)
                return
            for item in group:  # find the request that failed; the others get their answer
                await self._run_group([item])
            return
        start = 0
        for inputs, future in group:
            end = start + len(inputs)
            if not future.done():
                future.set_result(Embeddings(result.vectors[start:end], result.tokens[start:end]))
            start = end


@dataclass
class StepRequest:
    """One generation inside a StepLoop: what to run and where its deltas go."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[object], None]  # thread-safe: hands a Delta or an exception to the client
    extra: Any = None  # what the engine prepared for this request beside its params (a grammar)
    cancelled: bool = False


class StepLoop(abc.ABC):
    """The batching engines' scheduler: one thread owns the engine's batch state and moves
    every running request forward one token per step (iteration-level batching).

    Requests arrive on a queue; each step the loop drops what was cancelled, admits what
    waits (``_admit``) and runs one batched step (``_step``). The thread is the only thing
    that touches the engine's state, so no lock is held while the engine computes; an idle
    loop sleeps on the queue.
    """

    def __init__(self, name: str):
        self._pending: queue.Queue = queue.Queue()
        self._waiting: list[StepRequest] = []  # off the queue, not admitted yet
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- what each engine's loop provides ---------------------------------------------------
    @abc.abstractmethod
    def running(self) -> int:
        """Requests admitted into the batch."""

    @abc.abstractmethod
    def _drop_cancelled(self) -> None:
        """Frees the batch entries of cancelled requests."""

    @abc.abstractmethod
    def _admit(self) -> None:
        """Moves waiting requests (self._waiting) into the batch while there is room."""

    @abc.abstractmethod
    def _step(self) -> None:
        """One batched forward pass; emits a Delta to every request that got a token."""

    @abc.abstractmethod
    def _fail_running(self, error: Exception) -> None:
        """Ends every admitted request with ``error`` and clears the batch."""

    def _free(self) -> None:
        """Releases the engine's resources once the thread has stopped."""

    # -- the event loop's side ----------------------------------------------------------------
    async def stream(self, prompt: list[int], params: SamplingParams, extra: Any = None) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        request = StepRequest(list(prompt), params, lambda item: loop.call_soon_threadsafe(deltas.put_nowait, item),
                              extra)
        self._pending.put(request)
        finished = False
        try:
            while True:
                item = await deltas.get()
                if isinstance(item, BaseException):
                    finished = True  # the loop already let go of it
                    raise item
                finished = item.finish_reason is not None  # the loop freed its slot itself
                yield item
                if finished:
                    return
        finally:
            if not finished:  # client gone or stop found: the slot frees at the next step
                request.cancelled = True
                self._pending.put(None)  # wakes an idle loop

    def queued(self) -> int:
        return len(self._waiting) + self._pending.qsize()

    def busy(self) -> int:
        return self.running() + self.queued()

    def close(self) -> None:
        from llmserve.errors import EngineError

        self._closed = True
        self._pending.put(None)
        self._thread.join()
        self._fail_running(EngineError("The model was unloaded while this request ran."))
        self._take_pending(block=False)
        for request in self._waiting:
            request.emit(EngineError("The model was unloaded before this request started."))
        self._waiting = []
        self._free()

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        from llmserve.errors import EngineError

        while not self._closed:
            self._take_pending(block=not self.running() and not self._waiting)
            if self._closed:
                return
            self._waiting = [r for r in self._waiting if not r.cancelled]
            self._drop_cancelled()
            try:
                self._admit()
                self._step()
            except Exception as exc:  # the engine failed: its requests end, the loop goes on
                self._fail_running(EngineError(f"The engine failed: {type(exc).__name__}: {exc}"))

    def _take_pending(self, block: bool) -> None:
        try:
            item = self._pending.get(block=block)
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._pending.get_nowait()
        except queue.Empty:
            pass


class EngineThread:
    """One dedicated thread per model for engines whose objects are not thread-safe.

    Every call into the engine goes through this thread, one at a time, so the event
    loop never blocks and two requests never touch the engine at once.
    """

    def __init__(self, name: str):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def call(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self):
        self._executor.shutdown(wait=True)
