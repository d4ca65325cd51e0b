"""Prometheus metrics per model alias, served on BentoML's own /metrics.

``bentoml.metrics`` is BentoML's drop-in for prometheus_client that sets up its
multiprocess registry, so these show up next to BentoML's own metrics.
"""

from __future__ import annotations

import time

import bentoml

from backends.base import Delta

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)

REQUESTS_RUNNING = bentoml.metrics.Gauge(
    name="llm_requests_running",
    documentation="Generation requests running now",
    labelnames=["model"],
    multiprocess_mode="livesum",
)
REQUESTS_TOTAL = bentoml.metrics.Counter(
    name="llm_requests_total",
    documentation="Finished generation requests, by status (stop, length, error, aborted)",
    labelnames=["model", "status"],
)
PROMPT_TOKENS = bentoml.metrics.Counter(
    name="llm_prompt_tokens_total", documentation="Prompt tokens processed", labelnames=["model"]
)
GENERATION_TOKENS = bentoml.metrics.Counter(
    name="llm_generation_tokens_total", documentation="Tokens generated", labelnames=["model"]
)
TTFT = bentoml.metrics.Histogram(
    name="llm_time_to_first_token_seconds",
    documentation="Time from request to first generated token",
    labelnames=["model"],
    buckets=_LATENCY_BUCKETS,
)
ITL = bentoml.metrics.Histogram(
    name="llm_inter_token_latency_seconds",
    documentation="Time between generated tokens of one request",
    labelnames=["model"],
    buckets=_LATENCY_BUCKETS,
)
MODEL_LOAD_SECONDS = bentoml.metrics.Histogram(
    name="llm_model_load_seconds",
    documentation="Time to load a model (what a request that triggered an on-demand load waited)",
    labelnames=["model"],
    buckets=(0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600),
)


class RequestMetrics:
    """Records one generation request: created when it starts, finish() when it ends."""

    def __init__(self, model: str, prompt_tokens: int):
        self.model = model
        self.start = self.last = time.perf_counter()
        self.tokens = 0
        self.done = False
        # the labelled children, looked up once: on_delta runs for every token
        self._running = REQUESTS_RUNNING.labels(model=model)
        self._ttft, self._itl = TTFT.labels(model=model), ITL.labels(model=model)
        self._generated = GENERATION_TOKENS.labels(model=model)
        self._running.inc()
        PROMPT_TOKENS.labels(model=model).inc(prompt_tokens)

    def on_delta(self, d: Delta) -> None:
        new = d.completion_tokens - self.tokens
        if new <= 0:
            return
        now = time.perf_counter()
        if self.tokens == 0:
            self._ttft.observe(now - self.start)
        else:
            # one observation per token; a delta carrying several spreads its gap evenly
            for _ in range(new):
                self._itl.observe((now - self.last) / new)
        self.tokens, self.last = d.completion_tokens, now
        self._generated.inc(new)

    def finish(self, status: str) -> None:
        if self.done:
            return
        self.done = True
        self._running.dec()
        REQUESTS_TOTAL.labels(model=self.model, status=status).inc()
