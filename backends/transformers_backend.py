"""Hugging Face Transformers: causal LMs (chat, completion) and encoders (embeddings).

Generation is batched at the iteration level by a loop of our own (BatchLoop): every
step runs one forward pass for all running requests, a new request joins the batch as soon
as its prompt is prefilled (in chunks, between decode steps, so a long prompt does not
freeze the others) and a finished or cancelled one leaves it at once. Each request keeps
its own sampling parameters and random generator. On CPU this measured faster than
transformers' own ContinuousBatchingManager (ENVIRONMENT.md: 29 tok/s for 8 sequences
against 71 for a padded batch).

On a GPU (TransformersArgs ``engine``: "auto" there, or "paged") transformers' own continuous
batching generates instead (transformers_paged.PagedEngine: a paged KV cache of a bounded size);
it serves plain sampling, and the fields it cannot (logprobs, prompt logprobs, penalties,
logit_bias, grammars, seed) are refused with a 400 naming them.

A request asking for its prompt's logprobs has every position's logits kept at its prefill (the
others only the last one's), so chunks and batching stay as they are for it.

LoRA adapters (PEFT) sit on the loaded model: the first one wraps it in a PeftModel, each more is
one more named adapter, loaded and deleted on the loop's thread between steps. Rows of one batch
run with different adapters (or none) in one forward pass through PEFT's mixed-adapter batches
(``adapter_names``: each LoRA layer adds its adapter's product to its rows only; base rows get the
base layer's output untouched). Measured against one forward pass per adapter group: 139 against
209 ms per decode step of 8 rows over base, alpha and beta (101 ms for the base alone), so mixed it
is. Transformers' continuous batching (the paged engine) selects no adapter per request: adapters
there are refused, naming `model`.

Embeddings, and a cross-encoder's scores (task "rerank": a ...ForSequenceClassification model),
run on the model's worker thread, concurrent requests joined into one forward pass (InputBatcher).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from .lora import check_targets, lora_shape
from .base import (CHAT, COMPLETION, EMBEDDINGS, RERANK, Adapter, Backend, Delta, Embeddings, SamplingParams, Scores,
                   TokenLogprob, release_memory)
from .convert import gguf_to_hf_dir
from .errors import BadInput, NotInstalled, Unloaded
from .prefix_cache import PrefixCache
from .scheduling import EngineThread, InputBatcher, StepLoop, StepRequest
from .text import IncrementalDetokenizer, hf_chat_ids, hf_token_bytes, log_softmax, logprob_entry, top_logprobs
from .transformers_paged import PagedEngine
from .grammar import structural_tag

log = logging.getLogger("llmserve")


def _import_engine(alias: str):
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise NotInstalled("transformers", exc.name or "transformers", alias) from None
    return torch, transformers


class TransformersBackend(Backend):
    name = "transformers"
    # per row in BatchLoop._sample; JSON schemas through xgrammar's matcher and token mask
    # (prompt_logprobs: from the prefill's logits, BatchLoop._prompt_logprobs)
    features = frozenset({"seed", "logprobs", "prompt_logprobs", "presence_penalty", "frequency_penalty",
                          "repetition_penalty", "min_p", "logit_bias", "response_format", "tool_choice"})

    model = None
    tokenizer = None
    batcher: Optional["BatchLoop"] = None  # generation aliases on our own loop
    paged: Optional[PagedEngine] = None  # or on transformers' continuous batching
    _grammar_compiler = None  # xgrammar's, made on the first constrained request

    async def load(self) -> None:
        self._torch, self._tf = _import_engine(self.alias)
        self._thread = EngineThread(f"hf-{self.alias}")
        await self._thread.call(self._load_sync)

    def _load_sync(self) -> None:
        torch, tf = self._torch, self._tf
        args = self.config.transformers
        location, gguf_file = self.config.location(), self.config.gguf_file
        if isinstance(location, Path) and location.is_file():  # a .gguf file
            location, gguf_file = location.parent, location.name
        dtype = getattr(torch, args.dtype) if args.dtype != "auto" else None
        if gguf_file and dtype is None:
            dtype = torch.float32  # GGUF dequantizes; fp32 on CPU answers best
        if gguf_file and dtype == torch.float32 and not args.random_weights:
            location, gguf_file = self._dequantized(location, gguf_file)
        kwargs = {"trust_remote_code": self.config.trust_remote_code}  # off unless the alias says so
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        model_kwargs = dict(kwargs)
        if dtype is not None:
            model_kwargs["dtype"] = dtype
        if not args.device_map or args.device_map == "cpu":
            # weights read into this process's memory (not mapped from their file, where they
            # would count in the memory measured at load only once a request has read them)
            model_kwargs["disable_mmap"] = True
        if args.device_map:
            model_kwargs["device_map"] = args.device_map
        if args.attn_implementation:
            model_kwargs["attn_implementation"] = args.attn_implementation
        self.tokenizer = tf.AutoTokenizer.from_pretrained(self.config.tokenizer or location, **kwargs)
        auto = {"embed": tf.AutoModel, "rerank": tf.AutoModelForSequenceClassification}.get(
            self.config.task, tf.AutoModelForCausalLM)
        if args.random_weights:  # like vLLM's load_format=dummy: real shapes, random weights
            config = tf.AutoConfig.from_pretrained(location, **kwargs)
            with torch.device(args.device_map or "cpu"):  # built where it runs, not copied there
                self.model = auto.from_config(config, dtype=model_kwargs.get("dtype", torch.float32),
                                              attn_implementation=args.attn_implementation).eval()
        else:
            self.model = auto.from_pretrained(location, **model_kwargs).eval()
        cfg = self.model.config
        ctx = args.max_context or getattr(cfg, "max_position_embeddings", None) or 2048
        if self.config.task in ("embed", "rerank"):
            ctx = min(ctx, self.tokenizer.model_max_length or ctx)
        self._ctx = int(ctx)
        if self.config.task in ("embed", "rerank"):
            work = self._embed_sync if self.config.task == "embed" else self._score_sync
            self._embedder = InputBatcher(lambda inputs: self._thread.call(self._loaded, work, inputs))
            return
        eos = set()
        for source in (self.model.generation_config, self.tokenizer):
            ids = getattr(source, "eos_token_id", None)
            if ids is not None:
                eos.update(ids if isinstance(ids, list) else [ids])
        if args.engine == "paged" or (args.engine == "auto" and self.model.device.type == "cuda"):
            try:  # a failed start or warm-up has stopped its loop thread; the model goes too
                self.paged = PagedEngine(self.model, self.tokenizer, eos, max_batch=args.max_batch,
                                         num_blocks=args.kv_cache_blocks, memory_fraction=args.kv_cache_memory_fraction,
                                         max_batch_tokens=args.max_batch_tokens, name=f"hf-paged-{self.alias}",
                                         cuda=self.model.device.type == "cuda")
            except BaseException:
                self._unload_sync()
                raise
            # its per-request processors: temperature, top_k, top_p only (no random generator per
            # request: no seed either)
            self.features = frozenset()
            return
        self.batcher = BatchLoop(torch, self.model, self.tokenizer, eos, args.max_batch, args.prefill_chunk,
                                 name=f"hf-batch-{self.alias}", prefix_bytes=int(args.prefix_cache_mib * 2**20))

    def _dequantized(self, location: Path, gguf_file: str) -> tuple[Path, Optional[str]]:
        """Where a float32 load of a GGUF reads from: its cached dequantized directory (the one
        vLLM loads too; dequantizing at every load took ~15 s of a 135M model's ~17 s on 2
        cores), or, where the cache cannot be written, the GGUF itself as before."""
        try:
            return gguf_to_hf_dir(location / gguf_file), None
        except OSError as exc:
            log.warning("%s: no cached float32 copy of the GGUF (%s); dequantizing it at this load", self.alias, exc)
            return location, gguf_file

    async def unload(self) -> None:
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.close)
        if self.paged is not None:
            await asyncio.to_thread(self.paged.close)
        await self._thread.call(self._unload_sync)
        self._thread.shutdown()

    def _unload_sync(self) -> None:
        self.model = self.tokenizer = self.batcher = self.paged = None
        release_memory()

    def _loaded(self, work, inputs):
        """``work`` on the model's thread, unless the model was unloaded after it was queued."""
        if self.model is None:
            raise Unloaded("The model was unloaded before this request started.")
        return work(inputs)

    def capabilities(self) -> set[str]:
        if self.config.task == "embed":
            return {EMBEDDINGS}
        if self.config.task == "rerank":
            return {RERANK}
        caps = {COMPLETION}
        if self.chat_template() or self.config.chat_template:  # the model's own, or the alias's
            caps.add(CHAT)
        return caps

    def running_requests(self) -> int:
        if self.paged is not None:
            return self.paged.running()
        return self.batcher.busy() if self.batcher else self._embedder.running

    def describe(self):
        info = super().describe()
        if self.paged is not None:
            info.update(engine="paged", max_batch=self.config.transformers.max_batch, kv_cache=self.paged.kv_cache(),
                        attn_implementation=self.model.config._attn_implementation)
        elif self.batcher:
            info.update(engine="loop", max_batch=self.batcher.max_batch, queued_requests=self.batcher.queued())
        else:
            info[f"{'embedding' if self.config.task == 'embed' else 'score'}_batches"] = self._embedder.batches
        return info

    def failure(self):
        if self.paged is not None:
            return self.paged.failure()
        return self.batcher.failure if self.batcher is not None else None

    def context_length(self) -> int:
        if self.paged is not None:  # one request must fit the paged cache
            return min(self._ctx, self.paged.max_tokens)
        return self._ctx

    async def encode_chat(self, messages, tools=None, template=None, generation_prompt=True):
        return await self._thread.call(hf_chat_ids, self.tokenizer, messages, tools, template, generation_prompt)

    def chat_template(self):
        return getattr(self.tokenizer, "chat_template", None)

    async def encode_text(self, text, special=True):
        return await self._thread.call(lambda: self.tokenizer(text, add_special_tokens=special)["input_ids"])

    async def decode(self, ids: list[int], special: bool = False) -> str:
        """Token ids back to text (token-id input of embeddings), on the model's thread."""
        return await self._thread.call(lambda: self.tokenizer.decode(ids, skip_special_tokens=not special))

    async def token_strs(self, ids: list[int]) -> list[str]:
        return await self._thread.call(self.tokenizer.convert_ids_to_tokens, ids)

    async def prepare(self, params: SamplingParams) -> None:
        if params.json_schema is not None or params.tool_grammar is not None:
            params.compiled = await self._thread.call(self._grammar, params)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        if self.paged is not None:
            return self.paged.stream(prompt_ids, params)
        if params.json_schema is None and params.tool_grammar is None:
            return self.batcher.stream(prompt_ids, params)
        return self._constrained(prompt_ids, params)

    async def _constrained(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        # compiling a grammar takes long (the first one builds the vocabulary's tables):
        # on the model's worker thread, so the event loop keeps every other stream going
        grammar = params.compiled if params.compiled is not None else await self._thread.call(self._grammar, params)
        stream = self.batcher.stream(prompt_ids, params, grammar)
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()

    def vocab_size(self) -> int:
        return self.model.config.get_text_config().vocab_size

    async def load_adapter(self, adapter: Adapter) -> None:
        if self.batcher is None:
            raise BadInput(f"Model {self.alias!r} runs on transformers' continuous batching (engine: paged), which "
                           "selects no LoRA adapter per request; serve adapters on an alias with engine: loop.",
                           param="model", code="adapters_unsupported")
        shape = lora_shape(adapter)
        check_targets(adapter, shape, (name for name, _ in self.model.named_modules()))
        await self.batcher.between_steps(self.batcher.add_adapter, adapter)

    async def unload_adapter(self, name: str) -> None:
        if self.batcher is not None:
            await self.batcher.between_steps(self.batcher.delete_adapter, name)

    def _grammar(self, params: SamplingParams):
        """xgrammar's compiled grammar for the request's tool calls or JSON schema (each request
        gets a matcher of its own)."""
        import json

        try:
            if params.tool_grammar is not None:
                return self._compiler().compile_structural_tag(structural_tag(params.tool_grammar))
            return self._compiler().compile_json_schema(json.dumps(params.json_schema))
        except Exception as exc:
            if params.tool_grammar is not None:
                raise BadInput(f"Cannot constrain output to these tools' schemas: {exc}", param="tools") from exc
            raise BadInput(f"Cannot constrain output to this JSON schema: {exc}", param="response_format") from exc

    def _compiler(self):
        import xgrammar

        if self._grammar_compiler is None:
            info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size())
            self._grammar_compiler = xgrammar.GrammarCompiler(info)
        return self._grammar_compiler

    async def embed(self, inputs: list[str]) -> Embeddings:
        return await self._embedder.run(inputs)

    async def score(self, pairs: list[tuple[str, str]]) -> Scores:
        return await self._embedder.run(pairs)

    def _score_sync(self, pairs: list[tuple[str, str]]) -> Scores:
        """One forward pass of the cross-encoder over the pairs, each read as the tokenizer pairs
        two texts ([CLS] query [SEP] document [SEP] for BERT), as vLLM's score task reads them."""
        torch = self._torch
        batch = self.tokenizer([q for q, _ in pairs], [d for _, d in pairs], padding=True, truncation=False,
                               return_tensors="pt")
        lengths = self._within_context(batch["attention_mask"], "documents")
        with torch.no_grad():
            logits = self.model(**batch).logits.float()
        # one label: its sigmoid (vLLM's score activation); several: the last label's probability
        scores = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)[:, -1]
        return Scores(scores.tolist(), lengths)

    def _within_context(self, mask, param: str) -> list[int]:
        """Each input's token count; an input past the model's context is a BadInput naming ``param``."""
        lengths = [int(n) for n in mask.sum(dim=1).tolist()]
        too_long = [i for i, n in enumerate(lengths) if n > self._ctx]
        if too_long:
            i = too_long[0]
            raise BadInput(
                f"{param}[{i}] has {lengths[i]} tokens, more than this model's maximum of {self._ctx}; "
                "shorten or split it.",
                param=param,
                code="context_length_exceeded",
                index=i,
            )
        return lengths

    def _embed_sync(self, inputs: list[str]) -> Embeddings:
        torch = self._torch
        args = self.config.transformers
        batch = self.tokenizer(inputs, padding=True, truncation=False, return_tensors="pt")
        mask = batch["attention_mask"]
        lengths = self._within_context(mask, "input")
        with torch.no_grad():
            hidden = self.model(**batch).last_hidden_state
        if args.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        if args.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return Embeddings(pooled.float().tolist(), lengths)


@dataclass
class _Row:
    """A request in the batch (or still prefilling, with a cache of its own)."""

    request: StepRequest
    generator: Any
    detok: IncrementalDetokenizer
    cache: Any = None  # own cache while prefilling; None once merged into the batch
    prefilled: int = 0
    reused: int = 0  # prompt tokens whose keys and values came from the prefix cache
    generated: int = 0
    matcher: Any = None  # xgrammar's GrammarMatcher when the output is constrained
    counts: dict[int, int] = field(default_factory=dict)  # generated tokens, for the penalties
    logprobs: Optional[list[TokenLogprob]] = None  # of the token just sampled
    # of the prompt tokens prefilled so far (when asked for), until the first Delta carries them
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None


class BatchLoop(StepLoop):
    """Iteration-level batching over one Hugging Face causal LM.

    The batch is one left-padded KV cache (DynamicCache) with an attention mask. A new
    request prefills with a cache of its own, ``prefill_chunk`` tokens per step, then its
    cache is padded and joined to the batch's; a request that ends is dropped from it, and
    columns that only padding uses are cut off. A prompt that starts like one prefilled before
    starts its own cache from a copy of that prefix (PrefixCache).
    """

    def __init__(self, torch, model, tokenizer, eos: set[int], max_batch: int, prefill_chunk: int, name: str,
                 prefix_bytes: int = 0):
        super().__init__(name)
        self.prefixes = PrefixCache(prefix_bytes) if prefix_bytes > 0 else None
        self.torch, self.model, self.tokenizer, self.eos = torch, model, tokenizer, eos
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.device = model.device
        self.rows: list[_Row] = []  # in the batch, in cache order
        self.prefilling: list[_Row] = []
        self.cache = None
        self.mask = None  # [rows, cache length] 1 where a real token is
        self.next_tokens: list[int] = []  # sampled for each row, not yet fed
        self._pieces: dict[int, bytes] = {}  # token id -> its bytes (logprobs ask for the same ones often)
        self.peft = None  # the PeftModel around self.model once an adapter is loaded
        self._calls: queue.Queue = queue.Queue()  # (fn, args, future): run on the loop's thread between steps
        self._thread.start()

    # -- LoRA adapters (on the loop's thread: the model's modules change under them) -----------
    async def between_steps(self, fn, *args):
        """``fn(*args)`` on the loop's thread before its next step (it wakes an idle loop)."""
        if self.failure is not None or self._closed:
            raise self._unavailable()
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, args, done))
        self._pending.put(None)
        if self.failure is not None or self._closed:  # it closed or died meanwhile: nothing runs it now
            self._run_calls(self._unavailable())
        return await asyncio.wrap_future(done)

    def _run_calls(self, error: Optional[Exception] = None) -> None:
        while True:
            try:
                fn, args, done = self._calls.get_nowait()
            except queue.Empty:
                return
            if error is not None:
                done.set_exception(error)
                continue
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - the caller's error
                done.set_exception(exc)

    def add_adapter(self, adapter: Adapter) -> None:
        from peft import PeftModel

        _check_shapes(adapter, self.model)  # before PEFT changes the model: a failed load leaves no trace
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, str(adapter.path), adapter_name=adapter.name,
                                                      is_trainable=False)
            else:
                self.peft.load_adapter(str(adapter.path), adapter_name=adapter.name, is_trainable=False)
        except (ValueError, RuntimeError, KeyError) as exc:  # shapes of another base, keys PEFT cannot read
            self._forget_adapter(adapter.name)
            raise BadInput(f"Adapter {adapter.name!r} does not fit this model: {exc}", param="model",
                           code="adapter_mismatch") from None
        self.peft.eval()

    def delete_adapter(self, name: str) -> None:
        self._forget_adapter(name)

    def _forget_adapter(self, name: str) -> None:
        if self.peft is not None and name in self.peft.peft_config:
            self.peft.delete_adapter(name)

    def _forward(self, adapters: list[Optional[str]], **inputs):
        """One forward pass, each row with its adapter (None: the base), in one batch."""
        if self.peft is None:
            return self.model(**inputs)
        return self.peft(**inputs, adapter_names=[a or "__base__" for a in adapters])

    def running(self) -> int:
        return len(self.rows) + len(self.prefilling)

    def _drop_cancelled(self) -> None:
        for row in self.prefilling:
            if row.request.cancelled:
                row.cache = None  # its own prefill cache, freed now rather than when the step ends
        self.prefilling = [r for r in self.prefilling if not r.request.cancelled]
        self._keep([i for i, r in enumerate(self.rows) if not r.request.cancelled])

    def _fail_running(self, error: Exception) -> None:
        if self._closed or self.failure is not None:  # nothing will run queued adapter calls any more
            self._run_calls(error)
        for row in self.rows + self.prefilling:
            row.request.emit(error)
        self.rows, self.prefilling, self.next_tokens = [], [], []
        self.cache = self.mask = None

    def _admit(self) -> None:
        self._run_calls()  # adapter loads and unloads, between two steps
        while self._waiting and self.running() < self.max_batch:
            request = self._waiting.pop(0)
            try:
                if self._faults is not None:
                    self._faults.check("admit", request.params.seed)
                row = self._row(request)
            except Exception as exc:  # this request's settings only: the others go on
                request.fail(exc)
                continue
            self.prefilling.append(row)
            request.admitted()

    def _row(self, request: StepRequest) -> _Row:
        seed = request.params.seed
        generator = self.torch.Generator(device=self.device)
        # any integer the client sent: torch takes 64 bits
        generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF if seed is not None else self.torch.seed())
        detok = IncrementalDetokenizer(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), request.prompt)
        row = _Row(request, generator, detok)
        adapter = request.params.adapter
        if adapter is not None and (self.peft is None or adapter not in self.peft.peft_config):
            raise BadInput(f"The adapter {adapter!r} is not loaded on this model.", param="model")
        if request.extra is not None:
            import xgrammar

            row.matcher = xgrammar.GrammarMatcher(request.extra)
        return row

    def _step(self) -> None:
        with self.torch.no_grad():
            budget = self.prefill_chunk  # prompt tokens this step, over as many prompts as fit
            for row in list(self.prefilling):
                if budget <= 0:
                    break
                self._drop_cancelled()  # a client gone during the last forward pass is not computed again
                if row.request.cancelled:
                    continue
                try:  # a prefill runs on the row's own cache: a failure ends that request alone
                    used, token = self._prefill_chunk(row, budget)
                except Exception as exc:
                    self._end_row(row, exc)
                    continue
                budget -= used
                if token is not None and row.request.cancelled:  # gone during its last chunk: not joined
                    row.cache = None
                elif token is not None:
                    try:
                        self._join(row, token)
                    except Exception as exc:  # in neither list now: answered here; the batch's cache
                        row.request.fail(exc)  # may be half-joined, so the batch fails too
                        raise
            self._drop_cancelled()
            if self.rows:
                self._decode()

    def _end_row(self, row: _Row, exc: Exception) -> None:
        """Ends a request that is prefilling or between prefill and batch (not yet joined)."""
        if row in self.prefilling:
            self.prefilling.remove(row)
        row.cache = None
        row.request.fail(exc)

    def _guarded(self, row: _Row, fn, *args):
        """``fn(*args)`` for one row; if it raises, that request ends with the error (None)."""
        try:
            return fn(*args)
        except Exception as exc:
            row.request.fail(exc)
            return None

    def _prefill_chunk(self, row: _Row, budget: int) -> tuple[int, Optional[int]]:
        """Prefills up to ``budget`` more tokens of ``row``'s prompt; returns how many, and the
        first token once the prompt is done and the request goes on (to join the batch)."""
        torch = self.torch
        prompt = row.request.prompt
        k = row.request.params.prompt_logprobs
        if row.cache is None:
            self._new_cache(row, reuse=k is None)  # prompt logprobs need every position's logits
        start = row.prefilled
        end = min(len(prompt), row.prefilled + budget)
        ids = torch.tensor([prompt[row.prefilled:end]], device=self.device)
        # every position's logits only for a request that asks for the prompt's logprobs (0: all)
        out = self._forward([row.request.params.adapter], input_ids=ids, past_key_values=row.cache, use_cache=True,
                            logits_to_keep=0 if k is not None else 1,
                            attention_mask=torch.ones((1, end), dtype=torch.long, device=self.device),
                            position_ids=torch.arange(row.prefilled, end, device=self.device)[None])
        row.prefilled = end
        if k is not None:
            self._prompt_logprobs(row, out.logits[0], start, end, k)
        if end < len(prompt):
            return end - start, None
        if self.prefixes is not None:
            self.prefixes.store(prompt, row.request.params.adapter, [(l.keys, l.values) for l in row.cache.layers])
        self.prefilling.remove(row)
        logits = out.logits[0, -1]
        token = self._sample_one(logits, row, int(logits.argmax()))
        return end - start, token if self._on_token(row, token) else None

    def _new_cache(self, row: _Row, reuse: bool) -> None:
        """The row's own cache, starting with the longest cached prefix of its prompt (``reuse``)."""
        from transformers import DynamicCache

        row.cache = DynamicCache(config=self.model.config)
        if self.prefixes is None:
            return
        if not all(type(layer).__name__ == "DynamicLayer" for layer in row.cache.layers):
            # a sliding-window (or other) layer keeps only part of the keys: no prefix to copy
            log.info("%s: the model's cache layers are not all full attention; prefix cache off", self._thread.name)
            self.prefixes = None
            return
        if not reuse:
            return
        n, layers = self.prefixes.lookup(row.request.prompt, row.request.params.adapter)
        for i, (keys, values) in enumerate(layers):
            row.cache.update(keys.clone(), values.clone(), i)  # copies: the batch's cache grows from them
        row.prefilled = row.reused = n

    def _prompt_logprobs(self, row: _Row, logits, start: int, end: int, k: int) -> None:
        """Adds the entries of prompt tokens ``start + 1 .. end`` to ``row.prompt_logprobs`` from
        the logits of positions ``start .. end - 1`` (one chunk's: the logits at a position are
        the distribution of the token after it, so a chunk's last one scores the next chunk's
        first token, known already). The model's raw distribution, as for generated tokens."""
        torch = self.torch
        prompt = row.request.prompt
        if row.prompt_logprobs is None:
            row.prompt_logprobs = [None]  # the first token: nothing comes before it
        stop = min(end, len(prompt) - 1)  # the last position's logits belong to the first generated token
        if stop <= start:
            return
        x = logits[: stop - start].float()
        targets = prompt[start + 1 : stop + 1]
        index = torch.tensor(targets, device=x.device)[:, None]
        # log-probabilities as raw logits less each row's logsumexp, only where they are read (the
        # full log_softmax, NaN and infinity mended, took twice as long on CPU)
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        if not bool(torch.isfinite(lse).all()):  # NaN or infinite logits: text.log_softmax's rules
            x = torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
            x = torch.nan_to_num(torch.log_softmax(x, dim=-1), nan=-9999.0)  # a row all -inf: all -9999
            lse = torch.zeros_like(lse)
        chosen = (x.gather(1, index) - lse).clamp_(min=-9999.0)[:, 0].tolist()
        best_lp, best_ids = [], []
        if k:
            best = x.topk(min(k, x.shape[-1]), dim=-1) if k > 1 else x.max(dim=-1, keepdim=True)
            best_lp, best_ids = (best.values - lse).clamp_(min=-9999.0).tolist(), best.indices.tolist()
        for j, token in enumerate(targets):
            top = [logprob_entry(t, v, self._piece) for t, v in zip(best_ids[j], best_lp[j])] if k else []
            text, data, value = logprob_entry(token, chosen[j], self._piece)
            row.prompt_logprobs.append(TokenLogprob(text, data, value, top))

    def _decode(self) -> None:
        torch = self.torch
        n = len(self.rows)
        ids = torch.tensor(self.next_tokens, device=self.device)[:, None]
        positions = self.mask.sum(dim=1, keepdim=True)
        self.mask = torch.cat([self.mask, torch.ones((n, 1), dtype=self.mask.dtype, device=self.device)], dim=1)
        out = self._forward([r.request.params.adapter for r in self.rows], input_ids=ids, past_key_values=self.cache,
                            attention_mask=self.mask, position_ids=positions, use_cache=True)
        logits = out.logits[:, -1]
        greedy = logits.argmax(dim=-1).tolist()
        keep = []
        for i, row in enumerate(self.rows):
            token = self._guarded(row, self._sample_one, logits[i], row, greedy[i])
            if token is not None and self._guarded(row, self._on_token, row, token):
                keep.append(i)
                self.next_tokens[i] = token
        self._keep(keep)

    def _on_token(self, row: _Row, token: int) -> bool:
        """Emits the token's text; False when the request ends with it."""
        params = row.request.params
        row.generated += 1
        n = row.generated
        prompt_lp, row.prompt_logprobs = row.prompt_logprobs, None  # on the first Delta only
        cached = row.reused if n == 1 else 0
        if token in self.eos and not params.ignore_eos:
            row.request.emit(Delta("", n, "stop", None, prompt_lp, cached_tokens=cached))
            return False
        if self._faults is not None:
            self._faults.check("detokenize", params.seed)
        text = row.detok.add(token)
        if n >= params.max_tokens:
            row.request.emit(Delta(text, n, "length", row.logprobs, prompt_lp, cached_tokens=cached))
            return False
        row.request.emit(Delta(text, n, None, row.logprobs, prompt_lp, cached_tokens=cached))
        return True

    def _sample_one(self, logits, row: _Row, greedy: Optional[int]) -> int:
        """The next token of one row from its logits (``greedy``: the batch's argmax for it)."""
        if self._faults is not None:
            self._faults.check("sample", row.request.params.seed)
        p = row.request.params
        # a seed changes nothing for a greedy pick, nor the prompt's logprobs (taken at the prefill)
        if greedy is not None and p.greedy() and p.features() <= {"seed", "prompt_logprobs"} and row.matcher is None:
            return greedy  # plain greedy: the batch's argmax
        raw = logits.float()
        token = self._sample_row(self._shape(raw, row), row)
        if p.logprobs is not None:  # of the model's own distribution, before the shaping
            row.logprobs = [top_logprobs(log_softmax(raw.cpu().numpy()), p.logprobs, token, self._piece)]
        if row.matcher is not None:
            row.matcher.accept_token(token)
        row.counts[token] = row.counts.get(token, 0) + 1
        return token

    def _piece(self, token: int) -> bytes:
        data = self._pieces.get(token)
        if data is None:
            data = self._pieces[token] = hf_token_bytes(self.tokenizer, token)
        return data

    def _shape(self, x, row: _Row):
        """Logit bias, penalties (over the generated tokens, as OpenAI's are) and the grammar."""
        torch, p = self.torch, row.request.params
        x = x.clone()
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=x.device)
            x[ids] += torch.tensor(list(p.logit_bias.values()), device=x.device)
        if row.counts and (p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1):
            ids = torch.tensor(list(row.counts), device=x.device)
            counts = torch.tensor(list(row.counts.values()), dtype=x.dtype, device=x.device)
            seen = x[ids]
            if p.repetition_penalty != 1:
                seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
            x[ids] = seen - p.frequency_penalty * counts - p.presence_penalty
        if row.matcher is not None:
            import xgrammar

            mask = xgrammar.allocate_token_bitmask(1, x.numel())
            row.matcher.fill_next_token_bitmask(mask)
            x = x[None].cpu()
            xgrammar.apply_token_bitmask_inplace(x, mask)
            x = x[0].to(self.device)
        return x

    def _sample_row(self, x, row: _Row) -> int:
        torch, p = self.torch, row.request.params
        x = torch.nan_to_num(x, nan=float("-inf"))  # a NaN logit never wins
        top = x.max()
        if p.greedy() or not torch.isfinite(top):
            return int(x.argmax())
        x = (x - top) / p.temperature  # shifted first: the best is 0, so no temperature overflows it
        if p.min_p > 0:
            probs = torch.softmax(x, dim=-1)
            x[probs < p.min_p * probs.max()] = float("-inf")
        if p.top_k:
            x[x < torch.topk(x, min(p.top_k, x.numel())).values[-1]] = float("-inf")
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            cumulative = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1)
            drop = cumulative - torch.softmax(sorted_x, dim=-1) > p.top_p  # keeps the token that crosses top_p
            x[order[drop]] = float("-inf")
        return int(torch.multinomial(torch.softmax(x, dim=-1), 1, generator=row.generator))

    # -- the batch cache ----------------------------------------------------------------------
    def _join(self, row: _Row, token: int) -> None:
        torch = self.torch
        length = row.prefilled
        mask = torch.ones((1, length), dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.mask = row.cache, mask
        else:
            total = max(self.mask.shape[1], length)
            for mine, theirs in zip(self.cache.layers, row.cache.layers):
                mine.keys = torch.cat([_pad_left(torch, mine.keys, total), _pad_left(torch, theirs.keys, total)])
                mine.values = torch.cat([_pad_left(torch, mine.values, total), _pad_left(torch, theirs.values, total)])
            self.mask = torch.cat([_pad_left(torch, self.mask, total), _pad_left(torch, mask, total)])
        row.cache = None
        self.rows.append(row)
        self.next_tokens.append(token)

    def _keep(self, keep: list[int]) -> None:
        """Keeps the rows at ``keep``; cuts the leading columns no remaining row uses."""
        if len(keep) == len(self.rows):
            return
        torch = self.torch
        self.rows = [self.rows[i] for i in keep]
        self.next_tokens = [self.next_tokens[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask[index]
        start = int(self.mask.any(dim=0).nonzero()[0])
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]


def _check_shapes(adapter: Adapter, model) -> None:
    """Each LoRA matrix of the adapter against the module it adapts (A: r x in, B: out x r), read
    from the safetensors header only: an adapter of another base is a BadInput naming `r` or the
    module, not a half-changed model."""
    from safetensors import safe_open

    path = adapter.path / "adapter_model.safetensors"
    if not path.is_file():
        return  # a .bin adapter: PEFT's own load checks it
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            module_path, _, kind = key.rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):
                continue
            name = module_path.removeprefix("base_model.model.")
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise BadInput(f"Adapter {adapter.name!r} adapts {name}, which this model does not have "
                               "(target_modules of another architecture).", param="target_modules",
                               code="adapter_mismatch") from None
            rows, cols = f.get_slice(key).get_shape()
            want = getattr(module, "in_features", None) if kind == "A.weight" else getattr(module, "out_features", None)
            got = cols if kind == "A.weight" else rows
            if want is not None and got != want:
                raise BadInput(f"Adapter {adapter.name!r}: its lora_{kind[0]} of {name} is {rows}x{cols}, but that "
                               f"module has {want} {'inputs' if kind == 'A.weight' else 'outputs'}: an adapter of "
                               "another base model.", param="model", code="adapter_mismatch")


def _pad_left(torch, t, length: int):
    """Pads the sequence dimension (-2 for keys and values [b, h, t, d], -1 for a mask [b, t])
    on the left with zeros up to ``length``."""
    dim = -1 if t.dim() == 2 else -2
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)
