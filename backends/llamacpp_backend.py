"""llama.cpp through llama-cpp-python: GGUF models on CPU (or GPU layers).

Generation runs the way llama.cpp's own server does it, with slots: one context holds
``parallel`` sequences, and one scheduler thread (the only thing that touches the context)
builds one batch per step from the next token of every decoding sequence plus a chunk of
the prompt of newly admitted ones, decodes it with one ``llama_decode``, and samples each
sequence with its own sampler chain. A finished or cancelled sequence frees its slot at
once; a slot keeps its tokens in the KV cache so that the next prompt with the same prefix
only prefills what differs (llama.cpp's ``cache_prompt``).

A request asking for its prompt's logprobs (echo + logprobs) has the logits of every prompt
position it prefills read back after the decode; the slot keeps those entries beside its cached
tokens, so a later such request reuses the cached prefix only as far as its entries reach.

LoRA adapters (Backend.load_adapter) are loaded into the model once each
(``llama_adapter_lora_init``; a PEFT directory is converted to a LoRA GGUF first, convert.py).
llama.cpp applies adapters to a whole context, not per sequence, so a step decodes once per group
of slots that share an adapter (the base is one group), setting the context's adapter before each:
requests for different adapters share the context and its KV cache, and each group still batches.
llama.cpp's own server does the same grouping (``can_batch_with`` compares the slots' LoRA sets),
but decodes one group per step and the others wait for the steps after it. A slot's cached tokens
are reused only by a request for the same adapter (their KV entries were computed with it).

Embedding aliases use llama-cpp-python's ``Llama.embed`` on the model's engine thread,
with concurrent requests joined into one call (InputBatcher); they rerank by cosine similarity
(llmserve/serving/retrieval.py). No rank-pooling (cross-encoder) GGUF is served here yet: an
alias with task "rerank" fails to load with a message saying so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import os
from pathlib import Path
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from .base import (CHAT, COMPLETION, EMBEDDINGS, Adapter, Backend, Delta, Embeddings, SamplingParams, TokenLogprob,
                   release_memory)
from .convert import gguf_requantize, peft_to_lora_gguf
from .grammar import gbnf
from .errors import BadInput, EngineFailure, NotInstalled, Unloaded
from .scheduling import EngineThread, InputBatcher, StepLoop, StepRequest
from .text import ByteDetokenizer, log_softmax, template_error, top_logprobs

log = logging.getLogger("llmserve")

_POOLING = {"mean": "LLAMA_POOLING_TYPE_MEAN", "cls": "LLAMA_POOLING_TYPE_CLS", "last": "LLAMA_POOLING_TYPE_LAST"}


class LlamaCppBackend(Backend):
    name = "llamacpp"
    # all in the slot's sampler chain; JSON schemas become llama.cpp grammars (GBNF)
    features = frozenset({"seed", "logprobs", "prompt_logprobs", "presence_penalty", "frequency_penalty",
                          "repetition_penalty", "min_p", "logit_bias", "response_format", "tool_choice"})

    llm = None  # embedding aliases: a Llama object
    model = None  # generation aliases: the model, and a Scheduler owning the context
    scheduler: Optional["Scheduler"] = None

    async def load(self) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise NotInstalled("llamacpp", "llama_cpp", self.alias) from None
        self._lib = llama_cpp
        self._thread = EngineThread(f"llamacpp-{self.alias}")
        await self._thread.call(self._load_sync)

    def _model_path(self) -> str:
        path = self.config.location()
        if self.config.gguf_file:
            path = os.path.join(path, self.config.gguf_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        if self.config.llamacpp.quantize:
            path = gguf_requantize(path, self.config.llamacpp.quantize)
        return str(path)

    def _load_sync(self) -> None:
        if self.config.task == "rerank":
            raise BadInput(f"Model {self.alias!r}: llama.cpp serves no cross-encoder (task: rerank) here; give the "
                           "alias task: embed to rerank by cosine similarity, or serve the reranker on "
                           "Transformers or vLLM.", param="task")
        lib = self._lib
        args = self.config.llamacpp
        path = self._model_path()
        threads = args.n_threads or max(1, os.cpu_count() or 1)
        if self.config.task == "embed":
            # an input is embedded in one batch, so the batch is the whole context; llama.cpp pads
            # the context to a multiple of 256 (and aborts on a batch that is not padded alike)
            n_ctx = -(-args.n_ctx // 256) * 256
            self.llm = lib.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                 n_gpu_layers=args.n_gpu_layers, n_threads=threads, verbose=False, embedding=True,
                                 pooling_type=getattr(lib, _POOLING[args.pooling]))
            # inputs stay within what the alias asked and the model was trained on, not the padding
            bounds = [args.n_ctx, self.llm.n_ctx(), self.llm.n_batch]
            n_ctx_train = self.llm._model.n_ctx_train() if getattr(self.llm, "_model", None) else 0
            self._embed_limit = min(bounds + ([n_ctx_train] if n_ctx_train > 0 else []))
            self._embedder = InputBatcher(lambda inputs: self._thread.call(self._embed_sync, inputs))
            return
        from llama_cpp._internals import LlamaModel
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's own log lines only for errors
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = args.n_gpu_layers
        self.model = LlamaModel(path_model=path, params=mparams, verbose=False)
        self.scheduler = Scheduler(lib, self.model, args.parallel, args.n_ctx, args.n_batch, args.prefill_chunk,
                                   threads, name=f"llamacpp-slots-{self.alias}")
        self._metadata = self.model.metadata()  # the GGUF's keys: the chat template, what adapters must fit
        self._template = self._metadata.get("tokenizer.chat_template")
        self._formatters = {}  # template text -> its compiled formatter

    async def unload(self) -> None:
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.close)
        await self._thread.call(self._unload_sync)
        self._thread.shutdown()

    def _unload_sync(self) -> None:
        if self.llm is not None:
            self.llm.close()
        if self.model is not None:
            self.model.close()
        self.llm = self.model = self.scheduler = None
        release_memory()

    def capabilities(self) -> set[str]:
        if self.config.task == "embed":
            return {EMBEDDINGS}
        # the alias's chat_template serves a model without one of its own
        return {COMPLETION, CHAT} if self._template or self.config.chat_template else {COMPLETION}

    def running_requests(self) -> int:
        return self.scheduler.busy() if self.scheduler else self._embedder.running

    def failure(self):
        return self.scheduler.failure if self.scheduler is not None else None

    def context_length(self) -> int:
        if self.scheduler:
            return self.scheduler.n_ctx_seq
        # Llama.embed refuses an input longer than its batch (or cuts it with truncate=True)
        return self._embed_limit

    def describe(self):
        info = super().describe()
        if self.scheduler:
            info.update(parallel=self.scheduler.n_slots, queued_requests=self.scheduler.queued(),
                        adapter_mixed_steps=self.scheduler.mixed_steps)
        else:
            info.update(embedding_batches=self._embedder.batches)
        return info

    # -- prompts: on the engine thread, beside the scheduler (the vocabulary is read-only) but
    # never beside an unload freeing the model
    def chat_template(self):
        return self._template

    def _formatter(self, template: str, generation_prompt: bool = True):
        """The GGUF's chat template (or the alias's) compiled once, rendered as Transformers does."""
        formatter = self._formatters.get((template, generation_prompt))
        if formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            formatter = self._formatters[template, generation_prompt] = Jinja2ChatFormatter(
                template=template,
                eos_token=self.model.token_get_text(self.model.token_eos()),
                bos_token=self.model.token_get_text(self.model.token_bos()),
                add_generation_prompt=generation_prompt,
            )
        return formatter

    async def encode_chat(self, messages, tools=None, template=None, generation_prompt=True):
        def render():
            try:
                out = self._formatter(template or self._template, generation_prompt)(messages=messages, tools=tools)
            except Exception as exc:
                raise template_error(exc) from exc
            return self.model.tokenize(out.prompt.encode("utf-8"), add_bos=not out.added_special, special=True)

        return await self._thread.call(render)

    async def encode_text(self, text, special=True):
        # an embedding alias holds its Llama object only (no slot loop's model)
        tokenize = self.llm.tokenize if self.llm is not None else self.model.tokenize
        return await self._thread.call(tokenize, text.encode("utf-8"), special, False)

    def vocab_size(self) -> int:
        if self.llm is not None:  # an embedding alias
            return self.llm.n_vocab()
        return self._lib.llama_vocab_n_tokens(self.model.vocab)

    def _vocab_model(self):
        """The LlamaModel that holds the vocabulary (an embedding alias's is inside its Llama)."""
        return self.llm._model if self.llm is not None else self.model

    async def decode(self, ids: list[int], special: bool = False) -> str:
        """Token ids back to text (token-id input of embeddings), on the engine thread."""
        def detokenize() -> str:
            return self._vocab_model().detokenize(ids, special=special).decode("utf-8", errors="replace")

        return await self._thread.call(detokenize)

    async def token_strs(self, ids: list[int]) -> list[str]:
        """Each id's text in the vocabulary (what Hugging Face's convert_ids_to_tokens gives)."""
        return await self._thread.call(lambda: [self._vocab_model().token_get_text(t) for t in ids])

    async def prepare(self, params: SamplingParams) -> None:
        if params.json_schema is not None or params.tool_grammar is not None:
            params.compiled = await self._thread.call(self._grammar, params)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        if params.json_schema is None and params.tool_grammar is None:
            return self.scheduler.stream(prompt_ids, params)
        return self._constrained(prompt_ids, params)

    async def _constrained(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        # a grammar is built on the engine thread: a large schema never stalls the loop
        grammar = params.compiled if params.compiled is not None else await self._thread.call(self._grammar, params)
        async with aclosing(self.scheduler.stream(prompt_ids, params, grammar)) as deltas:
            async for delta in deltas:
                yield delta

    @staticmethod
    def _grammar(params: SamplingParams):
        """The GBNF grammar of the request's tool calls or JSON schema."""
        if params.tool_grammar is None:
            return json_grammar(params.json_schema)
        try:
            return gbnf(params.tool_grammar)
        except Exception as exc:
            raise BadInput(f"llama.cpp cannot constrain output to these tools' schemas: {exc}", param="tools") from exc

    # -- LoRA adapters -----------------------------------------------------------------------
    async def load_adapter(self, adapter: Adapter) -> None:
        if self.scheduler is None:
            raise BadInput(f"Model {self.alias!r} embeds: only generation aliases serve LoRA adapters.",
                           param="model", code="adapters_unsupported")
        path = Path(adapter.path)
        try:
            if path.is_dir():  # PEFT: converted once, off the event loop, beside the base's metadata
                path = await self._thread.call(peft_to_lora_gguf, path, self._metadata)
            elif not path.is_file():
                raise ValueError(f"no file or directory {str(path)!r}")
            await self.scheduler.call(self.scheduler.add_adapter, adapter.name, str(path))
        except ValueError as exc:
            raise BadInput(f"Adapter {adapter.name!r} does not fit model {self.alias!r}: {exc}",
                           param="model", code="adapter_mismatch") from exc

    async def unload_adapter(self, name: str) -> None:
        if self.scheduler is not None:
            await self.scheduler.call(self.scheduler.remove_adapter, name)

    # -- embeddings ---------------------------------------------------------------------------
    async def embed(self, inputs: list[str]) -> Embeddings:
        return await self._embedder.run(inputs)

    def _embed_sync(self, inputs: list[str]) -> Embeddings:
        tokens = []
        for i, text in enumerate(inputs):
            n = len(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
            if n > self.context_length():
                raise BadInput(
                    f"input[{i}] has {n} tokens, more than this model's context of {self.context_length()}.",
                    param="input",
                    code="context_length_exceeded",
                    index=i,
                )
            tokens.append(n)
        vectors = self.llm.embed(inputs, normalize=True, truncate=False)  # never cut: too long was refused above
        return Embeddings([list(map(float, v)) for v in vectors], tokens)


@dataclass(eq=False)  # compared and hashed by identity: a reloaded name is another adapter
class LoadedAdapter:
    name: str
    ptr: object  # the llama_adapter_lora; None once freed
    retiring: bool = False  # unloaded: freed once no running slot uses it


@dataclass
class Slot:
    seq: int
    request: Optional[StepRequest] = None
    # the adapter its running request and its cached tokens' KV entries were computed with (None: the base)
    adapter: Optional[LoadedAdapter] = None
    cached: list[int] = field(default_factory=list)  # tokens whose KV entries this sequence holds
    prefilled: int = 0  # prompt tokens in the KV cache so far
    next_token: Optional[int] = None  # sampled, not yet decoded
    generated: int = 0
    sampler: object = None
    detok: Optional[ByteDetokenizer] = None
    grammar: Optional[str] = None  # GBNF the output must follow
    # prompt logprob entries of cached[:len(prompt_lp)] (None for the first token), each with the
    # prompt_lp_k most likely tokens: what a request with prompt_logprobs gets of the cached
    # prefix it does not decode again; while such a request prefills, its own growing list
    prompt_lp: list[Optional[TokenLogprob]] = field(default_factory=list)
    prompt_lp_k: int = 0
    reused: int = 0  # prompt tokens of this request found in the slot's cache (not decoded again)


class Scheduler(StepLoop):
    """The slot loop: one thread, one context, one ``llama_decode`` per step for all slots."""

    def __init__(self, lib, model, n_slots: int, n_ctx_seq: int, n_batch: int, prefill_chunk: int, threads: int,
                 name: str):
        super().__init__(name)
        self.lib, self.model, self.n_slots = lib, model, n_slots
        from llama_cpp._internals import LlamaBatch, LlamaContext

        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx_seq * n_slots
        cparams.n_seq_max = n_slots
        cparams.kv_unified = False  # each sequence gets n_ctx / n_seq_max of the cache
        cparams.n_batch = cparams.n_ubatch = max(n_batch, n_slots)
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self.ctx = LlamaContext(model=model, params=cparams, verbose=False)
        # llama.cpp rounds the context up (to 256 per sequence at least): a request gets what
        # the alias asked for, never more than its sequence really holds
        self.n_ctx_seq = min(n_ctx_seq, lib.llama_n_ctx_seq(self.ctx.ctx))
        self.n_batch = cparams.n_batch
        self.prefill_chunk = prefill_chunk
        self.batch = LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self.slots = [Slot(seq=i) for i in range(n_slots)]
        self._piece = ctypes.create_string_buffer(256)
        self.adapters: dict[str, LoadedAdapter] = {}  # loaded and servable, by name
        self._ctx_adapter: Optional[LoadedAdapter] = None  # the one set on the context now
        self._commands: list[tuple] = []  # (fn, args, future): run on the loop thread between steps
        self.mixed_steps = 0  # steps that decoded more than one adapter group (for tests and describe)
        self._thread.start()

    # -- work the loop thread does for the backend between steps (adapters: they touch the model and
    # the context, which only this thread may) ---------------------------------------------------------
    async def call(self, fn, *args):
        future = concurrent.futures.Future()
        if self.failure is not None or self._closed:
            raise self._unavailable()
        self._commands.append((fn, args, future))
        self._pending.put(None)  # wakes an idle loop
        if self.failure is not None or self._closed:  # it closed or died meanwhile: nobody runs it
            self._answer_commands(self._unavailable())
        return await asyncio.wrap_future(future)

    def _run_commands(self) -> None:
        while self._commands:
            fn, args, future = self._commands.pop(0)
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except Exception as exc:  # the caller's error, not the loop's
                    future.set_exception(exc)

    def _answer_commands(self, error: Exception) -> None:
        while self._commands:
            try:
                _, _, future = self._commands.pop(0)
            except IndexError:  # the loop thread took the last one
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def add_adapter(self, name: str, path: str) -> None:
        """Loads the LoRA GGUF at ``path`` as ``name``; a ValueError carries llama.cpp's reason
        when it does not fit the model (another architecture, a tensor the model lacks or of
        another shape): llama.cpp returns NULL and says why only in its log, read here."""
        errors: list[str] = []
        from llama_cpp._logger import llama_log_callback as forward

        @self.lib.llama_log_callback
        def capture(level, text, user_data):
            if level == 4:  # GGML_LOG_LEVEL_ERROR in ggml.h (llama_cpp/_logger.py's table is older: 3)
                errors.append(text.decode("utf-8", "replace").strip())
            forward(level, text, user_data)

        self.lib.llama_log_set(capture, ctypes.c_void_p(0))
        try:
            ptr = self.lib.llama_adapter_lora_init(self.model.model, path.encode())
        finally:
            self.lib.llama_log_set(forward, ctypes.c_void_p(0))
        if not ptr:
            reason = errors[-1].split(": ", 1)[-1] if errors else "llama_adapter_lora_init failed"
            raise ValueError(f"llama.cpp: {reason}")
        if name in self.adapters:  # the same name again: the new files from now on
            self.remove_adapter(name)
        self.adapters[name] = LoadedAdapter(name, ptr)

    def remove_adapter(self, name: str) -> None:
        adapter = self.adapters.pop(name, None)
        if adapter is not None:
            adapter.retiring = True
            self._free_if_unused(adapter)

    def _free_if_unused(self, adapter: LoadedAdapter) -> None:
        if adapter.ptr is None or any(s.request is not None and s.adapter is adapter for s in self.slots):
            return
        if self._ctx_adapter is adapter:
            self._use(None)
        self.lib.llama_adapter_lora_free(adapter.ptr)
        adapter.ptr = None

    def _use(self, adapter: Optional[LoadedAdapter]) -> None:
        """Sets the context's adapter for the next decode (llama.cpp reserves its graph again when
        the set changes)."""
        if adapter is self._ctx_adapter:
            return
        if adapter is None:
            self.lib.llama_set_adapters_lora(self.ctx.ctx, None, 0, None)
        else:
            self.lib.llama_set_adapters_lora(self.ctx.ctx, (self.lib.llama_adapter_lora_p_ctypes * 1)(adapter.ptr), 1,
                                             (ctypes.c_float * 1)(1.0))
        self._ctx_adapter = adapter

    def _adapter_of(self, params: SamplingParams) -> Optional[LoadedAdapter]:
        if params.adapter is None:
            return None
        adapter = self.adapters.get(params.adapter)
        if adapter is None:
            raise BadInput(f"The adapter {params.adapter!r} is not loaded on this model.", param="model",
                           code="adapter_not_loaded")
        return adapter

    def running(self) -> int:
        return sum(s.request is not None for s in self.slots)

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled:
                self._release(slot)

    def _fail_running(self, error: Exception) -> None:
        for slot in self.slots:
            if slot.request is not None:
                slot.request.emit(error)
                self._release(slot, forget_cache=True)
        if self._closed or self.failure is not None:  # the loop is gone: nothing will run them
            self._answer_commands(Unloaded("The model was unloaded.") if self.failure is None
                                  else EngineFailure("The engine stopped.", detail=self.failure))

    def _free(self) -> None:
        self._use(None)
        for adapter in set(self.adapters.values()) | {s.adapter for s in self.slots if s.adapter is not None}:
            adapter.retiring = True
            self._free_if_unused(adapter)  # every slot was released by close
        self.adapters = {}
        self.batch.close()
        self.ctx.close()

    def _admit(self) -> None:
        """Each waiting request takes the free slot whose cached tokens share the longest
        prefix with its prompt (computed with the same adapter); only the rest of the prompt is
        prefilled. Adapter loads and unloads run first, between steps."""
        self._run_commands()
        while self._waiting:
            free = [s for s in self.slots if s.request is None]
            if not free:
                return
            request, slot = self._waiting.pop(0), None
            try:
                if self._faults is not None:
                    self._faults.check("admit", request.params.seed)
                adapter = self._adapter_of(request.params)
                slot = max(free, key=lambda s: _common_prefix(s.cached, request.prompt) if s.adapter is adapter else 0)
                self._start(slot, request, adapter)
            except Exception as exc:  # this request's settings only: the others go on
                if slot is not None and slot.request is request:
                    self._release(slot, forget_cache=True)
                request.fail(exc)
                continue
            request.admitted()  # its time limits count from here, not from its wait in the queue

    def _start(self, slot: Slot, request: StepRequest, adapter: Optional[LoadedAdapter]) -> None:
        # KV entries computed with another adapter (or the base) are no prefix of this request's
        common = _common_prefix(slot.cached, request.prompt) if slot.adapter is adapter else 0
        slot.adapter = adapter
        k = request.params.prompt_logprobs
        if k is None:
            keep = min(common, len(request.prompt) - 1)
        else:
            # the logits of a cached position are gone: keep only the prefix whose entries the slot
            # holds (entry j needs tokens 0..j to match), and decode again from the last of them,
            # whose logits give the next token's entry
            usable = min(common, len(slot.prompt_lp)) if slot.prompt_lp_k >= k else 0
            keep = max(0, usable - 1)
        if not self._trim(slot, keep, request):
            # a cache that cannot lose just its tail (sliding-window, recurrent models) is
            # emptied and the whole prompt prefilled, as llama.cpp's own server does
            log.info("%s: slot %d cannot drop the tail of its cached tokens; prefilling all %d prompt tokens",
                     self._thread.name, slot.seq, len(request.prompt))
            self.lib.llama_memory_seq_rm(self.ctx.memory, slot.seq, -1, -1)
            keep = 0
        if k is None:
            slot.prompt_lp = slot.prompt_lp[:keep]  # the tokens from keep on change
        else:
            kept = [None] + [TokenLogprob(e.token, e.bytes, e.logprob, e.top[:k]) for e in slot.prompt_lp[1:keep + 1]]
            slot.prompt_lp, slot.prompt_lp_k = kept, k
        slot.cached = request.prompt[:keep]
        slot.request, slot.prefilled, slot.next_token, slot.generated = request, keep, None, 0
        slot.reused = keep
        slot.detok = ByteDetokenizer()
        try:
            slot.sampler = self._sampler(request.params, request.extra)
        except Exception as exc:
            raise BadInput(f"llama.cpp refused the sampling settings: {exc}") from exc

    def _trim(self, slot: Slot, keep: int, request: StepRequest) -> bool:
        """Removes the slot's cached tokens from ``keep`` on; False when the cache cannot, or
        when a sliding window has already dropped entries the first ``keep`` need (the check
        llama.cpp's server makes before it reuses a slot's prompt)."""
        if self._faults is not None and self._faults.hits("trim", request.params.seed):
            return False
        if keep > 0:
            pos_min = self.lib.llama_memory_seq_pos_min(self.ctx.memory, slot.seq)
            n_swa = max(1, self.lib.llama_model_n_swa(self.model.model))
            if pos_min < 0 or pos_min > max(0, keep - n_swa):
                return False
        return bool(self.lib.llama_memory_seq_rm(self.ctx.memory, slot.seq, keep, -1))

    def _step(self) -> None:
        """One decode per adapter group of the running slots, each after setting its adapter; the
        prompt-chunk budget is the step's, shared by the groups. The group of the adapter the context
        has goes first: a change of adapter makes llama.cpp reserve its compute graph again (~6 ms a
        change here, beside ~110 ms for a decode of 2 tokens on one thread), so k groups cost k - 1
        changes a step, not k. Each group's decode reads all the weights: k groups cost ~k decodes."""
        groups: dict[Optional[LoadedAdapter], list[Slot]] = {}
        if any(s.request is not None and s.adapter is self._ctx_adapter for s in self.slots):
            groups[self._ctx_adapter] = []
        for slot in self.slots:
            if slot.request is not None:
                groups.setdefault(slot.adapter, []).append(slot)
        budget = self.prefill_chunk
        self.mixed_steps += len(groups) > 1
        for adapter, slots in groups.items():
            budget = self._decode(slots, adapter, budget)

    def _decode(self, slots: list[Slot], adapter: Optional[LoadedAdapter], prompt_budget: int) -> int:
        """Decodes the next token of each of ``slots`` that has one, and prompt chunks of the others
        within ``prompt_budget`` tokens, with ``adapter``; samples; returns the budget left."""
        batch, b = self.batch.batch, 0
        sample_at: list[tuple[Slot, int]] = []
        # (slot, batch index of its chunk's first token, the chunk's first position, end): the
        # prompt chunks whose every position asked for logits (prompt_logprobs)
        prompt_rows: list[tuple[Slot, int, int, int]] = []

        def add(token: int, pos: int, seq: int, logits: bool) -> None:
            nonlocal b
            batch.token[b], batch.pos[b], batch.n_seq_id[b] = token, pos, 1
            batch.seq_id[b][0], batch.logits[b] = seq, logits
            b += 1

        # the next token of every decoding sequence first, then prompt chunks in what room is left
        for slot in slots:
            if slot.next_token is not None:
                sample_at.append((slot, b))
                add(slot.next_token, len(slot.cached), slot.seq, True)
                slot.cached.append(slot.next_token)
        for slot in slots:
            request = slot.request
            if request is None or slot.next_token is not None or b >= self.n_batch or prompt_budget <= 0:
                continue
            end = min(len(request.prompt), slot.prefilled + self.n_batch - b, slot.prefilled + prompt_budget)
            prompt_budget -= end - slot.prefilled
            every = request.params.prompt_logprobs is not None
            if every:
                prompt_rows.append((slot, b, slot.prefilled, end))
            for pos in range(slot.prefilled, end):
                add(request.prompt[pos], pos, slot.seq, every or pos == len(request.prompt) - 1)
            slot.cached.extend(request.prompt[slot.prefilled:end])
            slot.prefilled = end
            if end == len(request.prompt):
                sample_at.append((slot, b - 1))
        if b == 0:
            return prompt_budget
        batch.n_tokens = b
        self._use(adapter)
        rc = self.lib.llama_decode(self.ctx.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        sample_at = [(slot, slot.request, index) for slot, index in sample_at]
        for slot, index, start, end in prompt_rows:
            request = slot.request
            try:  # one request's prompt logprobs: a failure ends it alone
                self._prompt_logprobs(slot, index, start, end)
            except Exception as exc:
                self._release(slot, forget_cache=True)
                request.fail(exc)
        for slot, request, index in sample_at:
            if slot.request is not request:  # ended above
                continue
            try:  # sampling and detokenizing one request: a failure ends it alone
                self._sample(slot, index)
            except Exception as exc:
                if slot.request is request:
                    self._release(slot, forget_cache=True)
                request.fail(exc)
        return prompt_budget

    def _prompt_logprobs(self, slot: Slot, index: int, start: int, end: int) -> None:
        """The entries of prompt tokens start+1 .. end (within the prompt) from the logits of
        positions start .. end-1, decoded at batch indices index, index+1, ...: numpy over a few
        rows at a time (a row is n_vocab floats; the temporaries of a whole chunk would be
        hundreds of MB), then each row's entry as a generated token's is made."""
        prompt, k = slot.request.prompt, slot.request.params.prompt_logprobs
        n = min(end, len(prompt) - 1) - start
        for first in range(0, max(n, 0), _ROWS_AT_ONCE):
            rows = min(_ROWS_AT_ONCE, n - first)
            lp = log_softmax(self._logit_rows(index + first, rows))
            tokens = prompt[start + first + 1:start + first + 1 + rows]
            slot.prompt_lp.extend(top_logprobs(lp[i], k, token, self._token_bytes) for i, token in enumerate(tokens))

    def _logit_rows(self, index: int, n: int):
        """The logits of batch indices index .. index+n-1 (all asked for) as an (n, n_vocab) array:
        a view of llama.cpp's buffer where its rows lie in batch order, as they do after a decode."""
        import numpy as np

        lib, ctx = self.lib, self.ctx.ctx
        n_vocab = lib.llama_vocab_n_tokens(self.model.vocab)
        first, last = lib.llama_get_logits_ith(ctx, index), lib.llama_get_logits_ith(ctx, index + n - 1)
        if not first or not last:
            raise RuntimeError(f"llama.cpp has no logits for batch rows {index}..{index + n - 1}")
        if ctypes.addressof(last.contents) - ctypes.addressof(first.contents) == (n - 1) * n_vocab * 4:
            return np.ctypeslib.as_array(first, shape=(n, n_vocab))
        return np.stack([np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, index + i), shape=(n_vocab,))
                         for i in range(n)])

    def _sample(self, slot: Slot, index: int) -> None:
        if self._faults is not None:
            self._faults.check("sample", slot.request.params.seed)
        k = slot.request.params.logprobs
        # the model's own distribution, read before the sampler chain changes the logits
        logprobs = self._logprobs(index) if k is not None else None
        token = self.lib.llama_sampler_sample(slot.sampler, self.ctx.ctx, index)
        self._on_token(slot, token, None if logprobs is None else [top_logprobs(logprobs, k, token, self._token_bytes)])

    def _logprobs(self, index: int):
        import numpy as np

        n_vocab = self.lib.llama_vocab_n_tokens(self.model.vocab)
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx.ctx, index), shape=(n_vocab,))
        return log_softmax(logits.astype(np.float32))

    def _on_token(self, slot: Slot, token: int, logprobs=None) -> None:
        request, params = slot.request, slot.request.params
        slot.generated += 1
        n = slot.generated
        # the first Delta carries the prompt's entries (a copy: the slot's list outlives it)
        prompt_lp = list(slot.prompt_lp) if n == 1 and params.prompt_logprobs is not None else None
        cached = slot.reused if n == 1 else 0
        if self.lib.llama_vocab_is_eog(self.model.vocab, token) and not params.ignore_eos:
            request.emit(Delta("", n, "stop", None, prompt_lp, cached_tokens=cached))
            self._release(slot)
            return
        if self._faults is not None:
            self._faults.check("detokenize", params.seed)
        text = slot.detok.add(self._token_bytes(token))
        if n >= params.max_tokens or len(slot.cached) >= self.n_ctx_seq:
            request.emit(Delta(text, n, "length", logprobs, prompt_lp, cached_tokens=cached))
            self._release(slot)
            return
        request.emit(Delta(text, n, None, logprobs, prompt_lp, cached_tokens=cached))
        slot.next_token = token

    def _release(self, slot: Slot, forget_cache: bool = False) -> None:
        slot.request, slot.next_token = None, None
        self._free_sampler(slot)
        if forget_cache:
            self.lib.llama_memory_seq_rm(self.ctx.memory, slot.seq, -1, -1)
            slot.cached, slot.prompt_lp = [], []
        if slot.adapter is not None and slot.adapter.retiring:  # unloaded while this slot ran with it
            self._free_if_unused(slot.adapter)

    def _free_sampler(self, slot: Slot) -> None:
        if slot.sampler is not None:
            self.lib.llama_sampler_free(slot.sampler)
            slot.sampler = None

    def _sampler(self, p: SamplingParams, grammar: Optional[str]):
        """The slot's sampler chain: bias, penalties and grammar shape the logits, then
        greedy or top-k / top-p / min-p / temperature / a seeded draw picks the token."""
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        n_vocab = lib.llama_vocab_n_tokens(self.model.vocab)
        if p.logit_bias:
            biases = (lib.llama_logit_bias * len(p.logit_bias))(*[lib.llama_logit_bias(t, b) for t, b in p.logit_bias.items()])
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), biases))
        if p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty:
            # over the generated tokens (the chain sees only those), as OpenAI's penalties are
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_penalties(
                n_vocab, self.n_ctx_seq, p.repetition_penalty, p.frequency_penalty, p.presence_penalty))
        if grammar is not None:
            constraint = lib.llama_sampler_init_grammar(self.model.vocab, grammar.encode(), b"root")
            if not constraint:
                lib.llama_sampler_free(chain)
                raise ValueError("the JSON schema's grammar did not parse")
            lib.llama_sampler_chain_add(chain, constraint)
        if p.greedy():
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        if p.top_k:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(p.min_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(p.temperature))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(sampler_seed(p.seed)))
        return chain

    def _token_bytes(self, token: int) -> bytes:
        n = self.lib.llama_token_to_piece(self.model.vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:  # a piece longer than the buffer: llama.cpp says how long; a bigger buffer from now on
            self._piece = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.model.vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[: max(n, 0)]


def json_grammar(schema: dict) -> str:
    """llama.cpp's grammar (GBNF) for JSON valid under ``schema``; a schema it cannot
    translate is the client's 400."""
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:
        raise BadInput(f"llama.cpp cannot constrain output to this JSON schema: {exc}",
                       param="response_format") from exc


_ROWS_AT_ONCE = 32  # prompt positions whose logprobs numpy computes together


LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's "draw a random seed"


def sampler_seed(seed: Optional[int]) -> int:
    """The 32-bit seed llama.cpp's dist sampler gets for a request's ``seed``: LLAMA_DEFAULT_SEED
    (random) only when none was given. Any other integer (negative, 64-bit) maps into the other
    2**32 - 1 values, itself when it is already one of them, so equal seeds draw alike; a
    plain ``& 0xFFFFFFFF`` sent seed -1 and 2**32 - 1 to the random seed."""
    return LLAMA_DEFAULT_SEED if seed is None else seed % LLAMA_DEFAULT_SEED


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
