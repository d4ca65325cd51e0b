"""The wire format of OpenAI's Files and Batch APIs (/v1/files, /v1/batches), pydantic only: the
create request, one line of an input file, the File and Batch objects and the lines of the
output and error files, shaped as the `openai` SDK's types (openai.types.FileObject, Batch)
read them. What runs a batch is llmserve/serving/batches.py; where it is kept, batch_store.py.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

# the endpoints a batch may name -> the request family it runs (serving/batches.py maps each
# onto the online route's operation)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
Status = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                 "cancelled"]
TERMINAL = {"failed", "completed", "expired", "cancelled"}

# OpenAI takes "24h" only; as batch peers do (AIBrix, Doubleword) other whole durations are taken
# too, in seconds, minutes, hours or days ("90m", "2h", "7d"), up to 30 days
_WINDOW = re.compile(r"^([1-9][0-9]{0,6})(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW = 30 * 86400


def window_seconds(window: str) -> int:
    """The seconds of a completion_window ("24h" -> 86400); ValueError for any other form."""
    m = _WINDOW.match(window)
    if m is None or int(m[1]) * _UNIT[m[2]] > MAX_WINDOW:
        raise ValueError(f"{window!r} is not a duration this server takes: \"24h\" (OpenAI's), or a whole number "
                         "of s, m, h or d up to 30 days (\"90m\", \"2h\")")
    return int(m[1]) * _UNIT[m[2]]


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # e.g. output_expires_after: result files here never expire

    input_file_id: str = Field(min_length=1)
    endpoint: Literal[ENDPOINTS]  # type: ignore[valid-type]
    completion_window: str = "24h"
    # OpenAI's metadata: at most 16 pairs, keys up to 64 characters, values up to 512
    metadata: Optional[dict[str, str]] = None

    @field_validator("completion_window")
    @classmethod
    def _window(cls, window: str) -> str:
        window_seconds(window)
        return window

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, metadata: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
        if metadata is None:
            return None
        if len(metadata) > 16:
            raise ValueError(f"has {len(metadata)} keys; at most 16")
        for key, value in metadata.items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError(f"key {key[:64]!r}: keys are at most 64 characters and values at most 512")
        return metadata


class InputLine(BaseModel):
    """One request of an input file: {"custom_id", "method": "POST", "url", "body"}."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: str
    body: dict[str, Any]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: Optional[int] = None
    status_details: Optional[str] = None


class BatchError(BaseModel):
    code: Optional[str] = None
    line: Optional[int] = None  # 1-based, as OpenAI counts the input file's lines
    message: Optional[str] = None
    param: Optional[str] = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    status: Status
    created_at: int
    model: Optional[str] = None
    errors: Optional[BatchErrors] = None
    output_file_id: Optional[str] = None
    error_file_id: Optional[str] = None
    in_progress_at: Optional[int] = None
    expires_at: Optional[int] = None
    finalizing_at: Optional[int] = None
    completed_at: Optional[int] = None
    failed_at: Optional[int] = None
    expired_at: Optional[int] = None
    cancelling_at: Optional[int] = None
    cancelled_at: Optional[int] = None
    request_counts: RequestCounts
    metadata: Optional[dict[str, str]] = None
    usage: Optional[dict[str, Any]] = None


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """Batch.usage: the tokens of the lines answered so far."""
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def result_line(line_id: str, custom_id: str, response: Optional[dict[str, Any]],
                error: Optional[dict[str, Any]]) -> dict[str, Any]:
    """One line of an output or error file: ``response`` is {status_code, request_id, body} of a
    request that ran (a 4xx answer included), ``error`` {code, message} of one that did not run."""
    return {"id": line_id, "custom_id": custom_id, "response": response, "error": error}


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A list endpoint's page: the SDK's cursor pages read data, has_more, and ask for the next
    page with after = the last id."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
