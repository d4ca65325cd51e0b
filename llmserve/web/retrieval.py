"""The retrieval routes, under /v1 and /api/v1: POST /rerank (Cohere / Jina shape, as vLLM and
llama.cpp's server take it), POST /score (vLLM's), POST /tokenize and POST /detokenize (vLLM's).
The root-level paths vLLM also serves (/rerank, /v2/rerank, /score, /tokenize, /detokenize) are
the BentoML native APIs of service.py, on the same operations (llmserve/serving/retrieval.py)."""

# no `from __future__ import annotations`: the handlers' body types are read by FastAPI at definition

from fastapi import APIRouter, Depends, Request

from ..retrieval_schemas import DetokenizeRequest, RerankRequest, ScoreRequest, TokenizeRequest
from .auth import check_api_key
from .responding import while_connected

router = APIRouter(dependencies=[Depends(check_api_key)])


def _route(path: str, body: type, operation: str) -> None:
    """POST ``path``: the body validated as ``body``, answered by the operation of that name
    (cancelled when the client leaves)."""

    async def handle(req: body, request: Request):
        return await while_connected(request, getattr(request.app.state.ops, operation)(req))

    router.add_api_route(path, handle, methods=["POST"], name=operation)


for _path, _body, _operation in (("/rerank", RerankRequest, "rerank"), ("/score", ScoreRequest, "score"),
                                 ("/tokenize", TokenizeRequest, "tokenize"),
                                 ("/detokenize", DetokenizeRequest, "detokenize")):
    _route(_path, _body, _operation)
