"""The BentoML service: the HTTP surface only. The server's own modules live in llmserve/,
the engines in backends/.

Request path: an HTTP route (llmserve/web/app.py, OpenAI-compatible, under /v1 and
/api/v1) or a BentoML API below -> OpenAIOperations (llmserve/serving/: one module per API
family on a shared base: checks, sampling, the generation's lifecycle, SSE chunks; the
Responses API in serving/responses.py maps onto its chat operation) -> ModelManager (llmserve/manager.py: alias -> loaded backend)
-> one backend in backends/*_backend.py -> its engine.

The generation routes stream one SSE chunk per token: BentoML's per-chunk tracing is
switched off for them and replaced by one span per request (llmserve/tracing.py).
"""

from __future__ import annotations

import logging

import bentoml
from fastapi.responses import JSONResponse
from starlette.responses import Response

from llmserve.anthropic_schemas import MessagesRequest
from llmserve.config import load_settings
from llmserve.metrics import metrics_endpoint
from llmserve.errors import to_api_error
from llmserve.web import anthropic
from llmserve.web.app import app
from llmserve.web.auth import NativeAPIKeys
from llmserve.web.middleware import BodyLimit, ByteOrderMark, ControlCharacterPaths
from llmserve.web.responding import error_response, respond, while_connected
from llmserve.runtime import Runtime
from llmserve.responses_schemas import ResponsesRequest
from llmserve.retrieval_schemas import DetokenizeRequest, RerankRequest, ScoreRequest, TokenizeRequest
from llmserve.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from llmserve.tracing import EXCLUDED_URLS, GenerationRouteSpans

log = logging.getLogger("llmserve")
settings = load_settings()  # fails start-up with a message naming any bad key


def openai_api(input_spec):
    """A BentoML API that takes an OpenAI request body and answers with the same
    Response the /v1 route gives: JSON, an SSE stream, or an OpenAI-shaped error.
    Declared as streaming so BentoML's clients read an SSE answer as it comes."""

    def decorate(func):
        method = bentoml.api(input_spec=input_spec)(func)
        method.is_stream = True
        return method

    return decorate


async def as_response(make, ctx: bentoml.Context | None = None, errors=error_response) -> Response:
    """The operation's answer as the /v1 route gives it; with the API's context, the work stops
    when the client leaves before the answer is ready (as on /v1: web.responding.while_connected).
    ``errors`` renders a failure in its family's shape (OpenAI's, or Anthropic's for /messages)."""
    try:
        request = ctx.request if ctx is not None else None
    except LookupError:  # called in-process, outside an HTTP request: no client to watch, no status
        request = None
    try:
        result = await (while_connected(request, make()) if request is not None else make())
    except Exception as exc:
        err = to_api_error(exc)
        if err is None:
            raise
        response = errors(err)  # a 429 keeps its Retry-After here too
    else:
        response = JSONResponse(result) if isinstance(result, dict) else respond(result)
    if request is not None:  # BentoML answers with the context's status when an API takes it
        ctx.response.status_code = response.status_code
    return response


# BentoML's own /metrics comes before the app's routes and answers while its metrics are on;
# this one answers when they are off (service.http_metrics: false or BENTOML_CONFIG)
app.add_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="llmserve",
    resources=settings.service_resources(),
    workers=settings.service.workers,
    traffic={"timeout": settings.service.timeout},
    tracing={"excluded_urls": EXCLUDED_URLS},
    metrics={"enabled": settings.service.http_metrics},
    logging={"access": {"enabled": settings.service.access_log}},
)
class LLMService:
    def __init__(self) -> None:
        self.runtime = Runtime(settings)
        self.ops = self.runtime.ops

    @bentoml.on_startup
    async def start_loading(self) -> None:
        # load in the background: /livez and /v1/models answer (with "loading") meanwhile
        await self.runtime.start()

    async def __is_ready__(self) -> bool:
        return self.runtime.ready()

    @bentoml.on_shutdown
    async def stop(self) -> None:
        await self.runtime.stop()

    # -- BentoML-native APIs: the same code as the /v1 routes -------------------------------
    @openai_api(ChatCompletionRequest)
    async def chat(self, ctx: bentoml.Context, **body) -> str:
        """Chat completion; the fields of OpenAI's /v1/chat/completions body."""
        return await as_response(lambda: self.ops.chat(ChatCompletionRequest.model_validate(body)), ctx)

    @openai_api(CompletionRequest)
    async def complete(self, ctx: bentoml.Context, **body) -> str:
        """Text completion; the fields of OpenAI's /v1/completions body."""
        return await as_response(lambda: self.ops.complete(CompletionRequest.model_validate(body)), ctx)

    @openai_api(EmbeddingRequest)
    async def embed(self, ctx: bentoml.Context, **body) -> str:
        """Embeddings; the fields of OpenAI's /v1/embeddings body."""
        return await as_response(lambda: self.ops.embed(EmbeddingRequest.model_validate(body)), ctx)

    @openai_api(ResponsesRequest)
    async def respond(self, ctx: bentoml.Context, **body) -> str:
        """Responses API; the fields of OpenAI's /v1/responses body."""
        return await as_response(lambda: self.runtime.responses.create(ResponsesRequest.model_validate(body)), ctx)

    @openai_api(MessagesRequest)
    async def messages(self, ctx: bentoml.Context, **body) -> str:
        """Anthropic Messages API; the fields of Anthropic's /v1/messages body, errors in its shape."""
        return await as_response(lambda: self.runtime.anthropic.create(MessagesRequest.model_validate(body)), ctx,
                                 anthropic.error_response)

    # -- retrieval (llmserve/web/retrieval.py has them under /v1): vLLM's root-level paths, same bodies
    @bentoml.api(input_spec=RerankRequest)
    async def rerank(self, ctx: bentoml.Context, **body) -> dict:
        """Rerank documents by relevance to a query (Cohere / Jina shape); /v1/rerank's body."""
        return await as_response(lambda: self.ops.rerank(RerankRequest.model_validate(body)), ctx)

    @bentoml.api(input_spec=RerankRequest, route="/v2/rerank")
    async def rerank_v2(self, ctx: bentoml.Context, **body) -> dict:
        """Cohere's v2 rerank (its SDK's ClientV2 with base_url at this server)."""
        return await as_response(lambda: self.ops.rerank(RerankRequest.model_validate(body), version=2), ctx)

    @bentoml.api(input_spec=ScoreRequest)
    async def score(self, ctx: bentoml.Context, **body) -> dict:
        """One relevance score per text_1 / text_2 pair (vLLM's /score)."""
        return await as_response(lambda: self.ops.score(ScoreRequest.model_validate(body)), ctx)

    @bentoml.api(input_spec=TokenizeRequest)
    async def tokenize(self, ctx: bentoml.Context, **body) -> dict:
        """Token ids of a prompt, or of messages as the chat route renders them (vLLM's /tokenize)."""
        return await as_response(lambda: self.ops.tokenize(TokenizeRequest.model_validate(body)), ctx)

    @bentoml.api(input_spec=DetokenizeRequest)
    async def detokenize(self, ctx: bentoml.Context, **body) -> dict:
        """Text of token ids (vLLM's /detokenize)."""
        return await as_response(lambda: self.ops.detokenize(DetokenizeRequest.model_validate(body)), ctx)

    @bentoml.api
    async def list_models(self) -> dict:
        return self.ops.list_models()

    @bentoml.api
    async def load_model(self, name: str) -> dict:
        return await as_response(lambda: self.ops.load_model(name))

    @bentoml.api
    async def unload_model(self, name: str) -> dict:
        return await as_response(lambda: self.ops.unload_model(name))


LLMService.add_asgi_middleware(GenerationRouteSpans)
LLMService.add_asgi_middleware(NativeAPIKeys, settings=settings, errors=anthropic.ERRORS)
# BentoML's native APIs (/chat, /embed, ...) get the body limit of the /v1 routes
LLMService.add_asgi_middleware(BodyLimit, limit=lambda: settings.limits.max_body_bytes, errors=anthropic.ERRORS)
LLMService.add_asgi_middleware(ByteOrderMark)
LLMService.add_asgi_middleware(ControlCharacterPaths)
