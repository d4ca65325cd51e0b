"""llama.cpp through llama-cpp-python: GGUF models on CPU (or GPU layers).

A ``Llama`` object is not thread-safe, so every call on it runs on the model's one
EngineThread: requests are served one at a time, off the event loop. Generation is
driven token by token (``Llama.generate``) so usage counts are exact and a closed
stream stops the engine at the next token.
"""

from __future__ import annotations

import os
from typing import AsyncIterator

from .base import (
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    Backend,
    ByteDetokenizer,
    Delta,
    Embeddings,
    EngineThread,
    SamplingParams,
    release_memory,
    template_error,
)
from .errors import EngineNotInstalled, InvalidRequest

_POOLING = {"mean": "LLAMA_POOLING_TYPE_MEAN", "cls": "LLAMA_POOLING_TYPE_CLS", "last": "LLAMA_POOLING_TYPE_LAST"}


class LlamaCppBackend(Backend):
    name = "llamacpp"

    llm = None

    async def load(self) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise EngineNotInstalled("llamacpp", "llama_cpp", self.alias) from None
        self._lib = llama_cpp
        self._thread = EngineThread(f"llamacpp-{self.alias}")
        await self._thread.call(self._load_sync)

    def _load_sync(self) -> None:
        lib = self._lib
        args = self.config.llamacpp
        path = self.config.location()
        if self.config.gguf_file:
            path = os.path.join(path, self.config.gguf_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        kwargs = dict(
            model_path=str(path),
            n_ctx=args.n_ctx,
            n_batch=args.n_batch,
            n_gpu_layers=args.n_gpu_layers,
            n_threads=args.n_threads or max(1, os.cpu_count() or 1),
            verbose=False,
        )
        if self.config.task == "embed":
            kwargs.update(embedding=True, pooling_type=getattr(lib, _POOLING[args.pooling]))
        self.llm = lib.Llama(**kwargs)
        self._formatter = None
        template = self.llm.metadata.get("tokenizer.chat_template")
        if template and self.config.task == "generate":
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            vocab = self.llm._model
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=vocab.token_get_text(self.llm.token_eos()),
                bos_token=vocab.token_get_text(self.llm.token_bos()),
                add_generation_prompt=True,
            )

    async def unload(self) -> None:
        await self._thread.call(self._unload_sync)
        self._thread.shutdown()

    def _unload_sync(self) -> None:
        if self.llm is not None:
            self.llm.close()
        self.llm = None
        release_memory()

    def capabilities(self) -> set[str]:
        if self.config.task == "embed":
            return {EMBEDDINGS}
        return {COMPLETION, CHAT} if self._formatter else {COMPLETION}

    def running_requests(self) -> int:
        return self._thread.active

    def context_length(self) -> int:
        return self.llm.n_ctx()

    def _is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.llm._model.vocab, token))

    async def encode_chat(self, messages):
        def render():
            try:
                out = self._formatter(messages=messages)
            except Exception as exc:
                raise template_error(exc) from exc
            return self.llm.tokenize(out.prompt.encode("utf-8"), add_bos=not out.added_special, special=True)

        return await self._thread.call(render)

    async def encode_text(self, text):
        return await self._thread.call(lambda: self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        return self._thread.stream(lambda emit, cancelled: self._generate_sync(prompt_ids, params, emit, cancelled))

    def _generate_sync(self, prompt_ids, params: SamplingParams, emit, cancelled) -> None:
        llm = self.llm
        if params.seed is not None:
            llm.set_seed(params.seed)
        detok = ByteDetokenizer()
        count, reason = 0, "length"
        previous = list(prompt_ids)
        for token in llm.generate(
            prompt_ids,
            temp=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k or 0,  # 0: no top-k cut, as OpenAI's API means
            min_p=0.0,
            repeat_penalty=1.0,
            reset=True,
        ):
            count += 1
            if self._is_eog(token) and not params.ignore_eos:
                reason = "stop"
                emit(Delta("", count))
                break
            text = detok.add(llm.detokenize([token], prev_tokens=previous, special=False))
            previous.append(token)
            emit(Delta(text, count))
            if count >= params.max_tokens or cancelled():
                reason = "length" if count >= params.max_tokens else "stop"
                break
            if len(previous) >= llm.n_ctx():
                break
        emit(Delta("", count, reason))

    async def embed(self, inputs: list[str]) -> Embeddings:
        return await self._thread.call(self._embed_sync, inputs)

    def _embed_sync(self, inputs: list[str]) -> Embeddings:
        n_tokens = 0
        for i, text in enumerate(inputs):
            n = len(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
            if n > self.llm.n_ctx():
                raise InvalidRequest(
                    f"input[{i}] has {n} tokens, more than this model's context of {self.llm.n_ctx()}.",
                    param="input",
                    code="context_length_exceeded",
                )
            n_tokens += n
        vectors = self.llm.embed(inputs, normalize=True)
        return Embeddings([list(map(float, v)) for v in vectors], n_tokens)
