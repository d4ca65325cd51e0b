"""Prometheus metrics per model alias, on /metrics (BentoML's, or metrics_endpoint when BentoML's is off).

prometheus_client directly (``bentoml.metrics``, its deprecated wrapper, warned at every
start): BentoML sets PROMETHEUS_MULTIPROC_DIR before a worker imports this, so every value is
a multiprocess file that BentoML's /metrics reads. A write to one takes a lock and an mmap
update, so the per-token figures (tokens generated, inter-token latency) are counted in the
request and written every FLUSH_TOKENS tokens or FLUSH_SECONDS, and when it ends.
"""

from __future__ import annotations

import bisect
import importlib.metadata
import time

import prometheus_client as prom
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from backends.base import Delta

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)

REQUESTS_RUNNING = prom.Gauge(
    name="llm_requests_running",
    documentation="Generation requests running now",
    labelnames=["model"],
    multiprocess_mode="livesum",
)
REQUESTS_TOTAL = prom.Counter(
    name="llm_requests_total",
    documentation="Finished generation requests, by status (stop, length, error, aborted)",
    labelnames=["model", "status"],
)
PROMPT_TOKENS = prom.Counter(
    name="llm_prompt_tokens_total", documentation="Prompt tokens processed", labelnames=["model"]
)
CACHED_PROMPT_TOKENS = prom.Counter(
    name="llm_prompt_tokens_cached_total",
    documentation="Prompt tokens found in the engine's prefix cache (not computed again)", labelnames=["model"]
)
# speculative decoding (an alias's `speculative:`): acceptance rate = accepted / draft
ENGINE_COUNTERS = {
    name: prom.Counter(name=f"llm_{name}_total", documentation=doc, labelnames=["model"])
    for name, doc in (("speculative_draft_tokens", "Tokens proposed by speculative decoding"),
                      ("speculative_accepted_tokens", "Proposed tokens the model accepted"))
}


def engine_counter(model: str):
    """What a backend's ``count(name, n)`` calls: adds to the engine counter ``name`` of ``model``."""
    children = {name: counter.labels(model=model) for name, counter in ENGINE_COUNTERS.items()}
    return lambda name, n: children[name].inc(n)


GENERATION_TOKENS = prom.Counter(
    name="llm_generation_tokens_total", documentation="Tokens generated", labelnames=["model"]
)
TTFT = prom.Histogram(
    name="llm_time_to_first_token_seconds",
    documentation="Time from request to first generated token",
    labelnames=["model"],
    buckets=_LATENCY_BUCKETS,
)
ITL = prom.Histogram(
    name="llm_inter_token_latency_seconds",
    documentation="Time between generated tokens of one request",
    labelnames=["model"],
    buckets=_LATENCY_BUCKETS,
)
MODEL_LOAD_SECONDS = prom.Histogram(
    name="llm_model_load_seconds",
    documentation="Time to load a model (what a request that triggered an on-demand load waited)",
    labelnames=["model"],
    buckets=(0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600),
)


FLUSH_TOKENS = 32
FLUSH_SECONDS = 0.5
_ITL_BOUNDS = _LATENCY_BUCKETS + (float("inf"),)  # the histogram's buckets, +Inf last as it keeps them
_PROM_VERSION = importlib.metadata.version("prometheus_client")


class RequestMetrics:
    """Records one generation request: created when it starts, finish() when it ends."""

    def __init__(self, model: str, prompt_tokens: int):
        self.model = model
        self.start = self.last = self.flushed_at = time.perf_counter()
        self.tokens = 0
        self.cached = 0  # prompt tokens the engine had cached (its first token's Delta says)
        self.counts_prompt = prompt_tokens > 0  # the first choice of its prompt (n > 1: the others count 0)
        self.done = False
        # the labelled children, looked up once
        self._running = REQUESTS_RUNNING.labels(model=model)
        self._ttft, self._itl = TTFT.labels(model=model), ITL.labels(model=model)
        self._generated = GENERATION_TOKENS.labels(model=model)
        # counted here between flushes: tokens, and the inter-token gaps per histogram bucket
        self._new_tokens, self._gap_counts, self._gap_sum = 0, [0] * len(_ITL_BOUNDS), 0.0
        self._running.inc()
        PROMPT_TOKENS.labels(model=model).inc(prompt_tokens)

    def on_delta(self, d: Delta) -> None:
        new = d.completion_tokens - self.tokens
        if new <= 0:
            return
        now = time.perf_counter()
        if self.tokens == 0:
            self._ttft.observe(now - self.start)
            if d.cached_tokens and self.counts_prompt:  # counted once per prompt, as its tokens are
                self.cached = d.cached_tokens
                CACHED_PROMPT_TOKENS.labels(model=self.model).inc(d.cached_tokens)
        else:
            # one observation per token; a delta carrying several spreads its gap evenly
            gap = now - self.last
            self._gap_counts[bisect.bisect_left(_ITL_BOUNDS, gap / new)] += new
            self._gap_sum += gap
        self.tokens, self.last = d.completion_tokens, now
        self._new_tokens += new
        if self._new_tokens >= FLUSH_TOKENS or now - self.flushed_at >= FLUSH_SECONDS:
            self._flush(now)

    def _flush(self, now: float) -> None:
        self.flushed_at = now
        if self._new_tokens:
            self._generated.inc(self._new_tokens)
            self._new_tokens = 0
        if self._gap_sum or any(self._gap_counts):
            _observe_many(self._itl, self._gap_counts, self._gap_sum)
            self._gap_counts, self._gap_sum = [0] * len(_ITL_BOUNDS), 0.0

    def finish(self, status: str) -> None:
        if self.done:
            return
        self.done = True
        self._flush(time.perf_counter())
        self._running.dec()
        REQUESTS_TOTAL.labels(model=self.model, status=status).inc()


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics when BentoML's own is off (service.http_metrics: false, or BentoML's
    metrics.enabled: false): these metrics as BentoML's endpoint writes them, from every
    worker's files when BentoML set up its multiprocess directory."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    client = BentoMLContainer.metrics_client.get()
    return Response(await run_in_threadpool(client.generate_latest), media_type=client.CONTENT_TYPE_LATEST)


def _observe_many(histogram, counts: list[int], total: float) -> None:
    """Adds observations counted per bucket to a labelled Histogram: one write per bucket
    used, where observe() writes twice per observation. prometheus_client has no public call
    for it, so its per-bucket values are written (the layout is checked at import, and
    pyproject bounds the release)."""
    buckets = histogram._buckets
    if len(buckets) != len(counts):
        raise RuntimeError(f"prometheus_client {_PROM_VERSION}: {len(buckets)} bucket values, not {len(counts)}")
    for value, n in zip(buckets, counts):
        if n:
            value.inc(n)
    histogram._sum.inc(total)


def _check_histogram_layout() -> None:
    """_observe_many relies on prometheus_client keeping a Histogram's upper bounds (+Inf
    last) in _upper_bounds and one non-cumulative value per bucket in _buckets (it sums them
    when collected): refuse to start on a release that does not, rather than count wrong."""
    bounds = getattr(ITL, "_upper_bounds", None)
    if bounds != list(_ITL_BOUNDS) or not all(hasattr(prom.Histogram, a) for a in ("_child_samples", "_metric_init")):
        raise RuntimeError(f"prometheus_client {_PROM_VERSION} keeps histogram buckets in a way "
                           "llmserve/metrics.py does not know; pin a release it supports (pyproject.toml)")


_check_histogram_layout()
