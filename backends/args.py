"""Each engine's own arguments (the ``llamacpp:`` / ``transformers:`` / ``vllm:`` keys of an
alias), validated by pydantic; llmserve's configuration schema is built from these models."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Unknown keys are errors that name the key."""

    model_config = ConfigDict(extra="forbid")


class SpeculativeArgs(StrictModel):
    """Speculative decoding for an alias (its ``speculative:`` key): proposed tokens are checked
    by the model in one pass, so a greedy answer is the same as without it, only sooner where
    the proposals are right."""

    # ngram: proposals copied from the prompt where its last tokens occurred before (prompt
    # lookup: quoting, code edits, extraction); draft: a small model of the same vocabulary
    method: Literal["ngram", "draft"] = "ngram"
    num_tokens: int = Field(4, ge=1, le=16)  # tokens proposed per step
    prompt_lookup_max: int = Field(4, ge=1)  # ngram: the longest n-gram matched
    prompt_lookup_min: int = Field(2, ge=1)  # ngram: the shortest
    draft_model: Optional[str] = None  # draft: its directory or Hugging Face id

    @model_validator(mode="after")
    def _consistent(self):
        if self.method == "draft" and not self.draft_model:
            raise ValueError("method: draft needs `draft_model` (a directory or Hugging Face id)")
        if self.method == "ngram" and self.draft_model:
            raise ValueError("`draft_model` is for method: draft; remove it or set method: draft")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("`prompt_lookup_min` is larger than `prompt_lookup_max`")
        return self


class LlamaCppArgs(StrictModel):
    n_ctx: int = Field(2048, ge=16)  # context of each request (each slot)
    parallel: int = Field(8, ge=1, le=256)  # sequences decoded together (slots)
    n_gpu_layers: int = 0
    n_threads: Optional[int] = Field(None, ge=1)
    n_batch: int = Field(512, ge=1)  # tokens per decode step: next tokens plus prompt chunks
    # prompt tokens prefilled per step beside the decoding sequences: a step of 512 prompt
    # tokens took ~1 s on 2 cores, a stall every running stream waits out
    prefill_chunk: int = Field(256, ge=1)
    # serve the GGUF converted to this type (once, cached): only some types have fast batched
    # CPU kernels (README, "llama.cpp quantization types")
    quantize: Optional[Literal["Q4_0", "Q4_1", "Q8_0", "F16"]] = None
    pooling: Literal["mean", "cls", "last"] = "mean"

    @property
    def concurrency(self) -> int:
        return self.parallel


class TransformersArgs(StrictModel):
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device_map: Optional[str] = None
    max_context: Optional[int] = Field(None, ge=16)
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    # benchmarks at real shapes: build the model from its config with random weights
    random_weights: bool = False
    max_batch: int = Field(16, ge=1)  # requests decoded together; more wait in a queue
    prefill_chunk: int = Field(128, ge=1)  # prompt tokens prefilled per step beside the decoding batch
    # the loop's prefix cache (backends/prefix_cache.py): MiB of recent prompts' keys and values kept
    # so that a prompt starting the same way skips that part of its prefill; 0 turns it off
    prefix_cache_mib: float = Field(256, ge=0)
    # which scheduler generates: "loop" our own BatchLoop (fastest on CPU), "paged" transformers'
    # continuous batching with a paged KV cache (transformers_paged.py); "auto": paged on a GPU
    engine: Literal["auto", "loop", "paged"] = "auto"
    attn_implementation: Optional[str] = None  # e.g. "sdpa", "flash_attention_2"; None: transformers' choice
    # the paged engine's KV cache: this many blocks, else this fraction of the memory left free
    # after the weights (bounded here so other aliases can share the GPU; transformers takes 0.9)
    kv_cache_blocks: Optional[int] = Field(None, ge=1)
    kv_cache_memory_fraction: float = Field(0.5, gt=0, le=0.95)
    max_batch_tokens: Optional[int] = Field(None, ge=16)  # the paged engine's tokens per step (prompts too)

    @model_validator(mode="after")
    def _knobs_of_the_chosen_engine(self):
        # under "auto" the engine is known only at load (the device): each ignores the other's knobs
        unused = {"loop": ("kv_cache_blocks", "kv_cache_memory_fraction", "max_batch_tokens"),
                  "paged": ("prefill_chunk", "prefix_cache_mib")}.get(self.engine, ())
        for key in unused:
            if key in self.model_fields_set:
                raise ValueError(f"`{key}` has no effect under engine: {self.engine} (it sets the "
                                 f"{'paged' if self.engine == 'loop' else 'loop'} engine); remove it")
        return self

    @property
    def concurrency(self) -> int:
        return self.max_batch


# the ranks vLLM's max_lora_rank may take (vllm.config.lora.MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class VllmArgs(StrictModel):
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    quantization: Optional[str] = None
    swap_space: Optional[float] = Field(None, ge=0)
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1)
    max_model_len: Optional[int] = Field(None, ge=16)
    dtype: str = "auto"
    enforce_eager: bool = False
    load_format: Optional[str] = None
    kv_cache_space_gib: Optional[float] = Field(None, gt=0)  # CPU only: VLLM_CPU_KVCACHE_SPACE
    max_num_seqs: Optional[int] = Field(None, ge=1)
    # "ray": the workers are Ray actors across the cluster's nodes (multi-node); "mp": processes of this host
    distributed_executor_backend: Optional[Literal["mp", "ray", "uni", "external_launcher"]] = None

    seed: Optional[int] = None
    # the largest LoRA rank its engine takes (vLLM reserves room for it); None: the smallest of vLLM's
    # ranks that holds every configured adapter's r
    max_lora_rank: Optional[int] = None

    @model_validator(mode="after")
    def _a_vllm_rank(self):
        if self.max_lora_rank is not None and self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"`max_lora_rank` must be one of vLLM's ranks {list(VLLM_LORA_RANKS)}")
        return self
    # anything else is passed to vllm.AsyncEngineArgs as is, and checked there
    extra: dict[str, Any] = Field(default_factory=dict)

    def lora_kwargs(self, ranks: list[int], slots: int) -> dict[str, Any]:
        """vLLM's LoRA engine arguments for an alias with adapters of these ranks, ``slots`` of them
        loaded at once (limits.max_loaded_adapters): LoRA on, room for that many in one batch (and
        in its CPU cache), and the rank they need. None configured: LoRA stays off."""
        if not slots:
            return {}
        rank = self.max_lora_rank or next((r for r in VLLM_LORA_RANKS if r >= max(ranks, default=1)), VLLM_LORA_RANKS[-1])
        # one more in its CPU cache: the server loads a new adapter before it evicts an idle one
        return {"enable_lora": True, "max_loras": slots, "max_cpu_loras": slots + 1, "max_lora_rank": rank}

    @property
    def uses_ray(self) -> bool:
        return "ray" in (self.distributed_executor_backend, self.extra.get("distributed_executor_backend"))

    @property
    def concurrency(self) -> int:
        return self.max_num_seqs or 256  # vLLM's own default on a GPU
