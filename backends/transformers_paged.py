"""Generation through transformers' own continuous batching (ContinuousBatchingManager): a paged
KV cache of a fixed size, requests scheduled by transformers' loop thread, CUDA graphs where its
attention path has them. The Transformers backend uses it for models on a GPU (TransformersArgs
``engine``), where our own BatchLoop copies every layer's cache at each admission.

This class turns the manager's per-request outputs (the whole token list so far, delivered on
the event loop by a handler registered before the request is added) into the Backend's Delta
stream: text, completion tokens, finish reason, counted here, as BatchLoop does. Sampling is
per request through transformers' per-request logits processors (temperature, top_k, top_p);
greedy is top_k 1, so no temperature divides the logits (a sample among the logits tied for the
top, which in bfloat16 happens: greedy there is not always the argmax's first index). What those processors cannot do
(logprobs, penalties, logit_bias, grammars, a seed) the backend refuses before the stream starts,
and so the prompt's logprobs: transformers' runner computes logits only at each request's last
scheduled position (its logits_indices) and hands back the sampled token's logprob alone. Nor does
it tell when it admits a request (its scheduler's lists are its own, and it delivers outputs only
with tokens), so this engine sends no base.ADMITTED: as with vLLM, the first token stands for it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import time
from typing import Any, AsyncIterator, Optional

from .base import Delta, SamplingParams
from .errors import EngineFailure
from .text import IncrementalDetokenizer

log = logging.getLogger(__name__)


class PagedEngine:
    """One ContinuousBatchingManager over a loaded causal LM, started and warmed up at once."""

    poll_s = 1.0  # how often open streams check that transformers' loop still runs

    def __init__(self, model, tokenizer, eos: set[int], *, max_batch: int, num_blocks: Optional[int],
                 memory_fraction: float, max_batch_tokens: Optional[int], name: str, cuda: bool):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        self.tokenizer, self.eos, self.name, self.max_batch = tokenizer, sorted(eos), name, max_batch
        self.vocab = model.config.get_text_config().vocab_size
        # processors exist only for settings away from their neutral value: these placeholders
        # make all three, and every request then passes its own values
        generation = GenerationConfig(do_sample=True, temperature=0.5, top_k=50, top_p=0.5,
                                      eos_token_id=self.eos or None, pad_token_id=self.eos[0] if self.eos else None)
        config = ContinuousBatchingConfig(
            num_blocks=num_blocks,
            max_memory_percent=memory_fraction,  # of the memory left free after the weights, not transformers' 0.9
            max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=max_batch,
            per_request_processors=True,
        )
        self.manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
        self._ids = itertools.count()
        self._open: dict[str, asyncio.Queue] = {}  # rid -> outputs, of the streams open now
        self._cancelled: dict[str, Optional[tuple[int, float]]] = {}  # rid -> (batch count, time) seen gone
        self._watching: Optional[asyncio.AbstractEventLoop] = None  # the loop _watch runs on
        try:
            self.manager.warmup()  # builds the paged cache and captures the CUDA graphs before any request
            self.max_tokens = self._max_tokens()
            self.manager.start()
            self.warm_up(cuda)
        except BaseException:
            # the loop thread is not a daemon and holds the model and the cache: nobody unloads an
            # engine that never loaded
            self.close()
            self.manager = None
            raise

    def warm_up(self, cuda: bool) -> None:
        """Short generations at load (on a worker thread), so the first clients do not pay for
        the loop's first batches. On a GPU, waves of 1, 2, 4 ... max_batch requests: transformers
        captures a CUDA graph the first time it meets a batch shape, which took seconds at 64
        streams on an H100 (benchmarks/RESULTS.md, issue 27)."""
        n, top = 1, self.max_batch if cuda else 1
        while True:
            for i in range(n):  # distinct prompts: shared prefixes would skip the prefill shapes
                prompt = [(i * 7919 + j * 31) % (self.vocab - 16) + 8 for j in range(96)]
                self.manager.add_request(prompt, request_id=f"{self.name}-warmup-{n}-{i}", max_new_tokens=8,
                                         eos_token_id=-1, temperature=1.0, top_k=1, top_p=1.0)
            for _ in range(n):
                out = self.manager.get_result(timeout=300)
                if out is None or out.error is not None:
                    raise EngineFailure("The engine failed its warm-up requests.",
                                        detail=out.error if out is not None else "no answer in 300 s")
            if n >= top:
                return
            n = min(2 * n, top)

    def kv_cache(self) -> dict[str, Any]:
        """The paged cache's size: blocks, tokens per block, bytes on the device."""
        cache = getattr(self.manager.batch_processor, "cache", None)
        if cache is None:
            return {}
        if getattr(cache, "cache_tensor", None) is not None:  # transformers >= 5.19: one buffer
            size = cache.cache_tensor.nbytes
        else:  # 5.17: one key and one value tensor per layer group
            size = sum(t.nbytes for t in list(getattr(cache, "key_cache", ())) + list(getattr(cache, "value_cache", ())))
        config = self.manager.continuous_batching_config  # page_size from 5.19, block_size before
        block = getattr(config, "page_size", None) or getattr(config, "block_size", None)
        return {"blocks": int(cache.num_blocks), "block_tokens": block, "bytes": int(size)}

    def _max_tokens(self) -> int:
        """The most tokens (prompt and completion) one request may hold: the cache less the
        scheduler's safety margin. A request the whole cache cannot hold is fatal to transformers'
        loop (nothing left to offload), so the service refuses it as past the context instead."""
        info = self.kv_cache()
        margin = self.manager.batch_processor.scheduler.safety_margin or 0.0
        return int(info["blocks"] * info["block_tokens"] * (1 - margin))

    def running(self) -> int:
        """Requests in transformers' loop (running, waiting, not yet taken in), read without its
        lock: a cancel that did not take effect still counts."""
        manager = self.manager
        scheduler = getattr(getattr(manager, "batch_processor", None), "scheduler", None)
        queued = manager.input_queue.qsize() if manager is not None else 0
        if scheduler is None:
            return queued
        return len(scheduler.active_requests) + len(scheduler.waiting_requests) + queued

    def failure(self) -> Optional[str]:
        error = self.manager.background_thread_status.fatal_error
        if error is not None:
            return f"its continuous-batching loop stopped ({error})"
        if not self.manager.is_running():
            return "its continuous-batching loop is not running"
        return None

    def close(self) -> None:
        # a hard stop: requests still running end with an error now, as BatchLoop's do, instead
        # of the manager finishing them first
        if self.manager._generation_thread is None:  # never started, or stopped already
            return
        self.manager.stop(block=True, timeout=30, hard_stop=True)
        if self.manager.is_running():
            log.warning("%s: transformers' generation loop still runs 30 s after its hard stop", self.name)

    def _sweep(self) -> None:
        """Drops the no-op handlers of cancelled requests once the cancel has taken effect: the
        request has left the scheduler and two batches ran since (one may have been in flight).
        Until then their outputs land in the no-op handler, not in the manager's output_queue,
        which nobody reads after the warm-up (anything there is drained here too). An idle loop
        runs no batch: there 2 s after it left do, longer than a step."""
        manager = self.manager
        router = manager.output_router
        scheduler = getattr(manager.batch_processor, "scheduler", None)
        batch, now = getattr(manager, "current_batch", 0), time.monotonic()
        for rid, seen in list(self._cancelled.items()):
            if scheduler is not None and (rid in scheduler.active_requests or rid in scheduler.waiting_requests):
                self._cancelled[rid] = None
            elif seen is None:
                self._cancelled[rid] = (batch, now)
            elif batch >= seen[0] + 2 or (now - seen[1] >= 2 and not self.running()) or not manager.is_running():
                del self._cancelled[rid]
                with router._lock:
                    router.result_handlers.pop(rid, None)
        while True:
            try:
                router.output_queue.get_nowait()
            except queue.Empty:
                break

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Every second while streams are open: if the loop died or stopped, each open stream gets
        None (a failure) instead of waiting out the service's stall timeout."""
        self._sweep()
        if not self._open and not self._cancelled:
            self._watching = None
            return
        if self._open and self.failure() is not None:
            for outputs in self._open.values():
                outputs.put_nowait(None)
        loop.call_later(self.poll_s, self._watch, loop)

    async def stream(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        failure = self.failure()
        if failure is not None:
            raise EngineFailure("The engine cannot serve this request now.", detail=failure)
        manager, tokenizer = self.manager, self.tokenizer  # bound: a slow consumer decodes on after an unload
        rid = f"{self.name}-{next(self._ids)}"
        outputs: asyncio.Queue = asyncio.Queue()
        manager.register_result_handler(rid, outputs.put_nowait)  # before the request: a fast one is not missed
        self._open[rid] = outputs
        loop = asyncio.get_running_loop()
        if self._watching is not loop:
            self._watching = loop
            loop.call_later(self.poll_s, self._watch, loop)
        if params.greedy():
            sampling = {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        else:
            sampling = {"temperature": float(params.temperature), "top_k": int(params.top_k or self.vocab),
                        "top_p": float(params.top_p)}
        done = False  # transformers' loop ended the request itself
        try:
            added = manager.add_request(list(prompt), request_id=rid, max_new_tokens=params.max_tokens,
                                        streaming=True, eos_token_id=-1 if params.ignore_eos else None, **sampling)
            if added is None:  # the manager is stopping
                raise EngineFailure("The engine cannot serve this request now.", detail="its loop is stopping")
            detok = IncrementalDetokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), prompt)
            n = 0
            while True:
                out = await outputs.get()
                if out is None:  # from _watch
                    raise EngineFailure("The engine failed on this request.", detail=self.failure())
                done = out.is_finished() or out.error is not None
                if out.error is not None:
                    raise EngineFailure("The engine failed on this request.", detail=out.error)
                for token in out.generated_tokens[n:]:
                    n += 1
                    if token in self.eos and not params.ignore_eos:
                        yield Delta("", n, "stop")
                        return
                    text = detok.add(token)
                    if n >= params.max_tokens:
                        yield Delta(text, n, "length")
                        return
                    yield Delta(text, n)
                if out.is_finished():  # ended by the manager itself with no token we stop on
                    yield Delta("", n, "stop")
                    return
        finally:
            del self._open[rid]
            if not done:  # client gone, stop string or an end token of ours: free its blocks
                manager.cancel_request(rid)
                # the batch in flight may still deliver outputs for it: a no-op handler takes them
                # (without one they pile up in the manager's output_queue) until _sweep drops it;
                # a cancelled request gets no last output, so its handler is not dropped by itself
                with manager.output_router._lock:
                    manager.output_router.result_handlers[rid] = (_ignore, loop)
                self._cancelled[rid] = None


def _ignore(_output) -> None:
    pass
