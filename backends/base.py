"""The one interface every engine implements: Backend, the sampling parameters it is given,
the deltas it streams back, and what it can do. Shared pieces live beside it: scheduling.py
(the engine thread, the step loop, the embedding batcher) and text.py (detokenizing, stop
sequences, chat templates, logprobs)."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional, Protocol

from .args import LlamaCppArgs, SpeculativeArgs, TransformersArgs, VllmArgs


class ModelSpec(Protocol):
    """What an engine reads of its alias's configuration (llmserve's ModelConfig is one)."""

    task: str  # "generate", "embed" or "rerank" (a cross-encoder: a sequence-classification model)
    gguf_file: Optional[str]
    tokenizer: Optional[str]
    trust_remote_code: bool
    llamacpp: LlamaCppArgs
    transformers: TransformersArgs
    vllm: VllmArgs
    speculative: Optional[SpeculativeArgs]  # None: no speculative decoding
    # LoRA adapters configured for the alias: served name -> where its files are (a PEFT
    # directory, or for llama.cpp a LoRA GGUF); an engine that must size itself for adapters at
    # load (vLLM's max_lora_rank) reads them here
    adapters: dict[str, Adapter]

    def adapter_slots(self) -> int:
        """How many of ``adapters`` may be loaded at once (the server's limit, at most as many as
        there are): what an engine that reserves room per adapter (vLLM's max_loras) sizes for."""
        ...

    def location(self) -> Path | str: ...

from .grammar import CallGrammar

# RERANK: scores (query, document) pairs with a cross-encoder (Backend.score); embedding aliases
# rerank too, by cosine similarity, in the serving layer (llmserve/serving/retrieval.py)
CHAT, COMPLETION, EMBEDDINGS, RERANK = "chat", "completion", "embeddings", "rerank"


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter served beside its base model under a name of its own."""

    name: str  # the name requests give (SamplingParams.adapter) and the engine knows it by
    path: Path  # a PEFT directory (adapter_config.json, adapter_model.safetensors) or a LoRA GGUF


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
    # None: none; k: each prompt token's logprob given the tokens before it, and the k most likely
    # there (what echo + logprobs asks of completions); sent on the generation's first Delta
    prompt_logprobs: Optional[int] = None
    presence_penalty: float = 0.0  # OpenAI's: minus this for every token already generated
    frequency_penalty: float = 0.0  # minus this times how often the token was generated
    repetition_penalty: float = 1.0  # vLLM / Hugging Face's: divides the logits of tokens seen
    min_p: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    json_schema: Optional[dict] = None  # the output is constrained to JSON valid under this schema
    tool_grammar: Optional[CallGrammar] = None  # or to tool calls in the model's format (tool_choice)
    compiled: Any = None  # the engine's own form of the constraint, made by Backend.prepare
    adapter: Optional[str] = None  # a loaded LoRA adapter's name (Backend.load_adapter); None: the base

    def greedy(self) -> bool:
        """Temperatures this small pick the most likely token (vLLM's threshold): dividing
        logits by less overflows them."""
        return self.temperature < 1e-5

    def features(self) -> set[str]:
        """The request fields these parameters use beyond plain sampling (see Backend.features)."""
        used = {
            "seed": self.seed is not None,
            "logprobs": self.logprobs is not None,
            "prompt_logprobs": self.prompt_logprobs is not None,
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
    # on the first Delta when SamplingParams.prompt_logprobs asks: one entry per prompt token,
    # None for the first (nothing comes before it)
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None
    # on a last Delta that a stop sequence ended: which one (Anthropic's stop_sequence, vLLM's stop_reason)
    stop_sequence: Optional[str] = None
    # on the first Delta with a token: prompt tokens whose KV the engine had cached and did not
    # compute again (a shared prefix; OpenAI's usage.prompt_tokens_details.cached_tokens)
    cached_tokens: int = 0


# The item a generation yields first once the engine has taken the request into its batch
# (a StepLoop's _admit): the time limits of a request count from it, not from the queue before
# it. Engines that cannot tell (vLLM schedules inside its own process) never send it, and their
# first token stands for it. Compared by identity; it carries no text or tokens.
ADMITTED = Delta("", 0)


@dataclass
class Embeddings:
    vectors: list[list[float]]
    tokens: list[int]  # prompt tokens of each input

    @property
    def prompt_tokens(self) -> int:
        return sum(self.tokens)

    def part(self, start: int, end: int) -> "Embeddings":
        """The answer to inputs start..end of a batch (scheduling.InputBatcher)."""
        return Embeddings(self.vectors[start:end], self.tokens[start:end])


@dataclass
class Scores:
    """A cross-encoder's relevance score of each (query, document) pair (higher: more relevant;
    a one-label model's sigmoid, in 0..1, as vLLM's score task gives it)."""

    values: list[float]
    tokens: list[int]  # tokens of each pair, as the model read it (query, document and specials)

    @property
    def prompt_tokens(self) -> int:
        return sum(self.tokens)

    def part(self, start: int, end: int) -> "Scores":
        return Scores(self.values[start:end], self.tokens[start:end])


class Backend(abc.ABC):
    """load / unload / encode / generate / embed / describe for one alias."""

    name: str = ""
    # set by the server once made: ``count(name, n)`` adds n to one of the engine's own counters
    # that requests do not show ("speculative_draft_tokens", "speculative_accepted_tokens")
    count: Callable[[str, int], None] = staticmethod(lambda name, n: None)
    # the SpeculativeArgs methods the engine serves; an alias asking for another fails to load
    speculative_methods: frozenset[str] = frozenset()
    # request fields beyond plain sampling that generate() honours (SamplingParams.features);
    # a request using any other gets a 400 naming the field and the engine
    features: frozenset[str] = frozenset()

    def __init__(self, alias: str, config: ModelSpec):
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
        """Why the engine can no longer serve (its process or loop died), or None while it can."""
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
            **({"speculative": spec.model_dump(exclude_none=True)}
               if (spec := getattr(self.config, "speculative", None)) is not None else {}),
        }

    # -- prompts ----------------------------------------------------------------------
    @abc.abstractmethod
    async def encode_chat(self, messages: list[dict], tools: Optional[list[dict]] = None,
                          template: Optional[str] = None, generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation rendered by the chat template (``template``, else the
        model's own) with ``tools=`` (OpenAI's tool objects) where given, ending with the
        assistant turn's opening (``generation_prompt``: what a generation continues from)."""

    def chat_template(self) -> Optional[str]:
        """The model's own chat template (its text), None when it has none."""
        return None

    @abc.abstractmethod
    async def encode_text(self, text: str, special: bool = True) -> list[int]:
        """Token ids of a plain completion prompt (with BOS, or the special tokens the model's
        tokenizer adds, where the model wants them, unless ``special`` is false)."""

    # -- work -------------------------------------------------------------------------
    async def prepare(self, params: SamplingParams) -> None:
        """What a request needs before its stream starts (an engine compiles its grammar here,
        off the event loop), so that a constraint it cannot serve is a BadInput raised before
        the first byte is sent, not an error event after it."""

    @abc.abstractmethod
    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Stream the completion. The last Delta carries finish_reason.

        Closing the iterator early (client gone, stop sequence found) must stop the
        engine's work on this request.
        """

    async def embed(self, inputs: list[str]) -> Embeddings:
        raise NotImplementedError

    # -- LoRA adapters ------------------------------------------------------------------
    async def load_adapter(self, adapter: Adapter) -> None:
        """Make ``adapter`` servable (requests name it in SamplingParams.adapter) without
        reloading the base; requests for different adapters and the base still batch together.
        An adapter the base cannot take (its rank past the engine's limit, target modules the
        base lacks, another base's shapes) is a BadInput whose message names the key at fault."""
        from .errors import BadInput

        raise BadInput(f"The {self.name} engine does not serve LoRA adapters.", param="model",
                       code="adapters_unsupported")

    async def unload_adapter(self, name: str) -> None:
        """Forget a loaded adapter. The manager calls it only once no request runs with it."""
        raise NotImplementedError

    async def score(self, pairs: list[tuple[str, str]]) -> Scores:
        """Relevance of each (query, document) pair, on a RERANK alias (concurrent calls batched
        where the engine does not batch by itself); a pair past the context is a BadInput."""
        raise NotImplementedError


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
