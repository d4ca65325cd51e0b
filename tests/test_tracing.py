"""The streaming routes get one trace span per request, not one per SSE chunk."""

from __future__ import annotations

import httpx
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from llmserve.tracing import EXCLUDED_URLS, GENERATION_PATHS, GenerationRouteSpans

CHUNKS = 50


async def _stream(request):
    async def events():
        for i in range(CHUNKS):
            yield f"data: {i}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def _models(request):
    return JSONResponse({"data": []})


APP = Starlette(routes=[Route("/v1/chat/completions", _stream, methods=["POST"]), Route("/models", _models)])


def _spans(middleware) -> list:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = middleware(APP, provider)

    async def call():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            r = await client.post("/v1/chat/completions", json={})
            assert r.text.count("data: ") == CHUNKS

    import asyncio

    asyncio.run(call())
    return exporter.get_finished_spans()


def test_opentelemetrys_own_middleware_opens_a_span_per_chunk():
    # why the service excludes the generation routes from BentoML's tracing middleware
    spans = _spans(lambda app, tp: OpenTelemetryMiddleware(app, tracer_provider=tp))
    assert len(spans) > CHUNKS


def test_generation_routes_get_one_server_span_per_request():
    spans = _spans(lambda app, tp: GenerationRouteSpans(app, tracer_provider=tp))
    assert len(spans) == 1
    (span,) = spans
    assert span.kind.name == "SERVER" and span.attributes.get("http.status_code", 200) == 200


def test_other_routes_are_left_to_bentomls_middleware():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = GenerationRouteSpans(APP, tracer_provider=provider)

    async def call():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            assert (await client.get("/models")).status_code == 200

    import asyncio

    asyncio.run(call())
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize("path", GENERATION_PATHS)
def test_the_service_excludes_every_generation_route_from_bentomls_tracing(path):
    import re

    import service

    excluded = service.LLMService.config["tracing"]["excluded_urls"]
    assert excluded == EXCLUDED_URLS
    assert any(re.search(p, f"http://127.0.0.1:3000{path}") for p in excluded)
    assert not any(re.search(p, "http://127.0.0.1:3000/v1/models") for p in excluded)
