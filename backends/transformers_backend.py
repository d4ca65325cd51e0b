"""Hugging Face Transformers: causal LMs (chat, completion) and encoders (embeddings).

All model calls run on one worker thread per model (EngineThread): the event loop
stays free and concurrent requests queue up and run one after another, each one
streaming its tokens as they come.
"""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

from .base import (
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    Backend,
    Delta,
    Embeddings,
    EngineThread,
    IncrementalDetokenizer,
    SamplingParams,
    release_memory,
    hf_chat_ids,
)
from .errors import EngineNotInstalled, InvalidRequest


def _import_engine(alias: str):
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise EngineNotInstalled("transformers", exc.name or "transformers", alias) from None
    return torch, transformers


class TransformersBackend(Backend):
    name = "transformers"

    model = None
    tokenizer = None

    async def load(self) -> None:
        self._torch, self._tf = _import_engine(self.alias)
        self._thread = EngineThread(f"hf-{self.alias}")
        await self._thread.call(self._load_sync)

    def _load_sync(self) -> None:
        torch, tf = self._torch, self._tf
        args = self.config.transformers
        location = self.config.location()
        kwargs = {}
        if isinstance(location, Path) and location.is_file():  # a .gguf file
            kwargs["gguf_file"] = location.name
            location = location.parent
        elif self.config.gguf_file:
            kwargs["gguf_file"] = self.config.gguf_file
        model_kwargs = dict(kwargs)
        if args.dtype != "auto":
            model_kwargs["dtype"] = getattr(torch, args.dtype)
        elif "gguf_file" in kwargs:
            model_kwargs["dtype"] = torch.float32  # GGUF dequantizes; fp32 on CPU answers best
        if args.device_map:
            model_kwargs["device_map"] = args.device_map
        self.tokenizer = tf.AutoTokenizer.from_pretrained(self.config.tokenizer or location, **kwargs)
        auto = tf.AutoModel if self.config.task == "embed" else tf.AutoModelForCausalLM
        if args.random_weights:  # like vLLM's load_format=dummy: real shapes, random weights
            config = tf.AutoConfig.from_pretrained(location, **kwargs)
            with torch.device(args.device_map or "cpu"):  # built where it runs, not copied there
                self.model = auto.from_config(config, dtype=model_kwargs.get("dtype", torch.float32)).eval()
        else:
            self.model = auto.from_pretrained(location, **model_kwargs).eval()
        cfg = self.model.config
        ctx = args.max_context or getattr(cfg, "max_position_embeddings", None) or 2048
        if self.config.task == "embed":
            ctx = min(ctx, self.tokenizer.model_max_length or ctx)
        self._ctx = int(ctx)
        self._eos = set()
        for source in (self.model.generation_config if self.config.task == "generate" else None, self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                self._eos.update(eos if isinstance(eos, list) else [eos])

    async def unload(self) -> None:
        await self._thread.call(self._unload_sync)
        self._thread.shutdown()

    def _unload_sync(self) -> None:
        self.model = self.tokenizer = None
        release_memory()

    def capabilities(self) -> set[str]:
        if self.config.task == "embed":
            return {EMBEDDINGS}
        caps = {COMPLETION}
        if getattr(self.tokenizer, "chat_template", None):
            caps.add(CHAT)
        return caps

    def running_requests(self) -> int:
        return self._thread.active

    def context_length(self) -> int:
        return self._ctx

    async def encode_chat(self, messages):
        return await self._thread.call(hf_chat_ids, self.tokenizer, messages)

    async def encode_text(self, text):
        return await self._thread.call(lambda: self.tokenizer(text)["input_ids"])

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        return self._thread.stream(lambda emit, cancelled: self._generate_sync(prompt_ids, params, emit, cancelled))

    def _generate_sync(self, prompt_ids, params: SamplingParams, emit, cancelled) -> None:
        torch, tf = self._torch, self._tf
        detok = IncrementalDetokenizer(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
        eos = self._eos

        class Streamer(tf.generation.streamers.BaseStreamer):
            prompt_seen = False
            count = 0

            def put(self, value):
                if not self.prompt_seen:  # generate() hands over the prompt first
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    self.count += 1
                    stop_token = token in eos and not params.ignore_eos
                    emit(Delta("" if stop_token else detok.add(token), self.count))

            def end(self):
                pass

        class Cancelled(tf.StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled(), dtype=torch.bool, device=input_ids.device)

        sample = params.temperature > 0
        gen_kwargs = dict(
            max_new_tokens=params.max_tokens,
            do_sample=sample,
            streamer=Streamer(),
            stopping_criteria=tf.StoppingCriteriaList([Cancelled()]),
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(eos), 0),
        )
        if sample:
            gen_kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0)
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.ignore_eos:
            gen_kwargs["min_new_tokens"] = params.max_tokens
        if params.seed is not None:
            torch.manual_seed(params.seed)
        input_ids = torch.tensor([prompt_ids], device=self.model.device)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **gen_kwargs)
        new = out[0, len(prompt_ids) :].tolist()
        hit_eos = bool(new) and new[-1] in eos and not params.ignore_eos
        reason = "length" if (len(new) >= params.max_tokens and not hit_eos) else "stop"
        emit(Delta("", len(new), reason))

    async def embed(self, inputs: list[str]) -> Embeddings:
        return await self._thread.call(self._embed_sync, inputs)

    def _embed_sync(self, inputs: list[str]) -> Embeddings:
        torch = self._torch
        args = self.config.transformers
        batch = self.tokenizer(inputs, padding=True, truncation=False, return_tensors="pt")
        mask = batch["attention_mask"]
        lengths = mask.sum(dim=1).tolist()
        too_long = [i for i, n in enumerate(lengths) if n > self._ctx]
        if too_long:
            i = too_long[0]
            raise InvalidRequest(
                f"input[{i}] has {lengths[i]} tokens, more than this model's maximum of {self._ctx}; "
                "shorten or split it.",
                param="input",
                code="context_length_exceeded",
            )
        with torch.no_grad():
            hidden = self.model(**batch).last_hidden_state
        if args.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        if args.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return Embeddings(pooled.float().tolist(), int(sum(lengths)))
