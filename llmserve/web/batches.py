"""The Files and Batch routes, under /v1 and /api/v1, with the inference routes' keys:
  POST /files (multipart: file, purpose=batch), GET /files, GET /files/{id},
  GET /files/{id}/content, DELETE /files/{id},
  POST /batches, GET /batches, GET /batches/{id}, POST /batches/{id}/cancel.
When keys are set, each file and batch belongs to the key that made it (a hash of it is kept):
another key gets a 404 for it and does not see it listed. The operations are
llmserve/serving/batches.py's."""

from __future__ import annotations

import hashlib
from typing import Literal, Optional

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from ..batch_schemas import BatchCreateRequest
from ..errors import APIError, InvalidRequest
from ..manager import MAY_LOAD
from ..serving.batches import BatchOperations
from .auth import check_api_key, credentials

router = APIRouter(dependencies=[Depends(check_api_key)])


def batch_ops(request: Request) -> BatchOperations:
    return request.app.state.batches


def owner(request: Request) -> str:
    """Whose rows a request sees: "" with no keys set (one tenant), else a hash of its key
    (check_api_key has checked it), so the store never holds a key."""
    settings = request.app.state.ops.settings
    if not settings.inference_keys() and not settings.admin_key_list():
        return ""
    _, _, key = credentials(request.headers).partition(" ")
    return hashlib.sha256(key.strip().encode()).hexdigest()


@router.post("/files")
async def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form(...),
                      b: BatchOperations = Depends(batch_ops)):
    if purpose != "batch":
        raise InvalidRequest(f"purpose {purpose!r} is not served here: files are for the Batch API, purpose \"batch\".",
                             param="purpose", code="invalid_value")
    limit = b.settings.batches.max_file_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise APIError(f"The file is larger than this server's limit of {limit} bytes (batches.max_file_bytes).",
                       status=413, param="file", code="file_too_large")
    return await b.upload(owner(request), file.filename or "upload.jsonl", purpose, data)


@router.get("/files")
async def list_files(request: Request, purpose: Optional[str] = None, after: Optional[str] = None,
                     limit: int = Query(10_000, ge=1, le=10_000), order: Literal["asc", "desc"] = "desc",
                     b: BatchOperations = Depends(batch_ops)):
    return await b.files(owner(request), purpose, after, limit, order)


@router.get("/files/{file_id}")
async def retrieve_file(file_id: str, request: Request, b: BatchOperations = Depends(batch_ops)):
    return await b.file(owner(request), file_id)


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, request: Request, b: BatchOperations = Depends(batch_ops)):
    return FileResponse(await b.content(owner(request), file_id), media_type="application/jsonl")


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, request: Request, b: BatchOperations = Depends(batch_ops)):
    return await b.delete_file(owner(request), file_id)


@router.post("/batches")
async def create_batch(req: BatchCreateRequest, request: Request, b: BatchOperations = Depends(batch_ops)):
    # its lines load models on demand as this key's requests would (check_api_key set MAY_LOAD)
    return await b.create(owner(request), req, MAY_LOAD.get())


@router.get("/batches")
async def list_batches(request: Request, after: Optional[str] = None, limit: int = Query(20, ge=1, le=100),
                       b: BatchOperations = Depends(batch_ops)):
    return await b.list(owner(request), after, limit)


@router.get("/batches/{batch_id}")
async def retrieve_batch(batch_id: str, request: Request, b: BatchOperations = Depends(batch_ops)):
    return await b.retrieve(owner(request), batch_id)


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request, b: BatchOperations = Depends(batch_ops)):
    return await b.cancel(owner(request), batch_id)
