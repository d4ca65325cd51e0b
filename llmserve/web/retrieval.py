"""The retrieval routes (rerank, score, tokenize, detokenize): filled in by issue 33's work."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from .auth import check_api_key

router = APIRouter(dependencies=[Depends(check_api_key)])
