"""The Batch API (/v1/files, /v1/batches): files in, one result line per request out.

BatchOperations is what the routes (llmserve/web/batches.py) call; BatchRunner runs the queue of
lines kept in llmserve/batch_store.py. Each line runs through the operation its online route runs
(chat, complete, embed, the Responses API's create), validated by the same request model, so a
line a route would refuse is an error line with the route's status and error body, never a failed
batch; only a file that is not a batch's JSONL at all (a line that is not JSON, a duplicate
custom_id, a url other than the batch's endpoint) fails the batch, at validation.

Interactive traffic goes first: batch lines of one alias hold at most ``batches.slot_share`` of
its slots (ModelConfig.concurrency(), at least one), start only into slots the interactive
requests leave free, and while any interactive request holds the alias no more than one batch
line starts; a line refused as overloaded (429) or while its model reloads (503) waits and is
queued again.

Each runner (one per server process) holds the lines it runs on a lease it renews every pass;
a line whose runner died (SIGKILL, a lost host) is queued again when its lease runs out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from pydantic import BaseModel, ValidationError

from ..batch_schemas import (Batch, BatchCreateRequest, BatchError, BatchErrors, FileObject, InputLine, RequestCounts,
                             page, result_line, usage, window_seconds)
from ..batch_store import BatchStore, batch_times, default_path, new_id, not_found
from ..config import Settings
from ..errors import InvalidRequest, internal_error, to_api_error, validation_error_to_api_error
from ..manager import MAY_LOAD
from ..responses_schemas import ResponsesRequest
from ..schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from . import OpenAIOperations
from .responses import ResponsesOperations

log = logging.getLogger("llmserve")

MAX_ATTEMPTS = 5  # runs of one line refused as overloaded or reloading before its refusal is its result
MAX_REPORTED_ERRORS = 100  # of a file that fails validation
UNKNOWN_ALIAS_LINES = 4  # lines naming no configured alias run (are refused) this many at a time


class Endpoint:
    """What a line of one endpoint runs: the online route's request model and operation."""

    def __init__(self, request: type[BaseModel], run: Callable[[Any], Awaitable[Any]], default_alias: Optional[str]):
        self.request, self.run, self.default_alias = request, run, default_alias


class BatchOperations:
    def __init__(self, ops: OpenAIOperations, responses: ResponsesOperations, settings: Settings):
        cfg = settings.batches
        path = Path(cfg.store_path).expanduser() if cfg.store_path else default_path()
        files = Path(cfg.files_dir).expanduser() if cfg.files_dir else path.parent / "batch-files"
        self.settings = settings
        self.store = BatchStore(path, files, cfg.max_files)
        default = settings.default_model
        self.endpoints = {
            "/v1/chat/completions": Endpoint(ChatCompletionRequest, ops.chat, default),
            "/v1/completions": Endpoint(CompletionRequest, ops.complete, default),
            "/v1/embeddings": Endpoint(EmbeddingRequest, ops.embed, settings.embedding_model or default),
            "/v1/responses": Endpoint(ResponsesRequest, responses.create, default),
        }
        self.runner = BatchRunner(self, ops.manager)

    async def start(self) -> None:
        await self.runner.start()

    async def stop(self) -> None:
        await self.runner.stop()
        self.store.close()

    # -- files ------------------------------------------------------------------------------
    async def upload(self, owner: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        return file_object(await self.store.run(self.store.add_file, owner, filename, purpose, data))

    async def file(self, owner: str, file_id: str) -> dict[str, Any]:
        return file_object(await self.store.run(self.store.get_file, owner, file_id))

    async def files(self, owner: str, purpose: Optional[str], after: Optional[str], limit: int, order: str
                    ) -> dict[str, Any]:
        rows, more = await self.store.run(self.store.list_files, owner, purpose, after, limit, order)
        return page([file_object(r) for r in rows], more)

    async def content(self, owner: str, file_id: str) -> Path:
        path = self.store.blob((await self.store.run(self.store.get_file, owner, file_id))["id"])
        if not path.is_file():  # its contents removed by hand
            raise not_found("file", "file_id", file_id)
        return path

    async def delete_file(self, owner: str, file_id: str) -> dict[str, Any]:
        await self.store.run(self.store.delete_file, owner, file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches ----------------------------------------------------------------------------
    async def create(self, owner: str, req: BatchCreateRequest, may_load: bool) -> dict[str, Any]:
        row = await self.store.run(self.store.create_batch, owner, req, window_seconds(req.completion_window),
                                   may_load)
        self.runner.wake.set()
        return await self.retrieve(owner, row["id"])

    async def retrieve(self, owner: str, batch_id: str) -> dict[str, Any]:
        return batch_object(await self.store.run(self.store.get_batch, owner, batch_id))

    async def list(self, owner: str, after: Optional[str], limit: int) -> dict[str, Any]:
        rows, more = await self.store.run(self.store.list_batches, owner, after, limit)
        return page([batch_object(r) for r in rows], more)

    async def cancel(self, owner: str, batch_id: str) -> dict[str, Any]:
        row = await self.store.run(self.store.cancel, owner, batch_id)
        self.runner.wake.set()
        return batch_object(row)

    # -- one line ---------------------------------------------------------------------------
    def alias_of(self, endpoint: str, body: dict[str, Any]) -> Optional[str]:
        """The alias a line's body names, as its operation will read it (None: not a name at all)."""
        model = body.get("model")
        if model is None or model == "":
            return self.endpoints[endpoint].default_alias
        return model if isinstance(model, str) else None

    async def answer(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """The status and body the online route would answer ``body`` with."""
        target = self.endpoints[endpoint]
        try:
            req = target.request.model_validate(body)
            if getattr(req, "stream", False):
                raise InvalidRequest("`stream` is not supported in a batch: each line's answer is one body in the "
                                     "output file.", param="stream", code="unsupported_value")
            result = await target.run(req)
            if not isinstance(result, dict):  # never: stream is refused above
                raise internal_error(TypeError(f"a batch line got {type(result).__name__}"))
            return 200, result
        except ValidationError as exc:
            err = validation_error_to_api_error(list(exc.errors()))
        except Exception as exc:
            err = to_api_error(exc) or internal_error(exc)
        return err.status, err.body()


class BatchRunner:
    """Validates new batches, runs their queued lines under each alias's bound, and closes
    batches (finished, expired, cancelled) into their output and error files."""

    def __init__(self, batches: BatchOperations, manager):
        self.batches, self.store, self.manager = batches, batches.store, manager
        self.settings = batches.settings
        self.wake = asyncio.Event()
        self.tasks: dict[tuple[str, int], asyncio.Task] = {}  # (batch id, line) -> its run
        self.running: Counter = Counter()  # alias -> its batch lines running
        self.paused: dict[Optional[str], float] = {}  # alias -> no new line before (monotonic), after a 429 / 503
        self.id = new_id("runner_")
        # how long a line stays this runner's without a renewal: several passes
        self.lease = max(10.0, 5 * self.settings.batches.poll_period)
        self._loop_task: Optional[asyncio.Task] = None

    async def start(self) -> None:
        await self.store.run(self.store.sweep_blobs)
        self._loop_task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stops every line and queues it again for the next start."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        await self._cancel(list(self.tasks))
        await self.store.run(self.store.release, self.id)

    async def _loop(self) -> None:
        while True:
            try:
                await self._pass()
            except Exception:
                log.exception("batches: the runner's pass failed; it runs again shortly")
            try:
                await asyncio.wait_for(self.wake.wait(), self.settings.batches.poll_period)
            except TimeoutError:
                pass
            self.wake.clear()

    async def _pass(self) -> None:
        store = self.store
        requeued = await store.run(store.renew, self.id, time.time() + self.lease)
        if requeued:
            log.info("batches: %d lines whose server stopped while running them are queued again", requeued)
        for batch in await store.run(store.batches_in, ["validating"]):
            await self._validate(batch)
        now = time.time()
        for batch in await store.run(store.batches_in, ["in_progress", "cancelling", "finalizing"]):
            status, bid = batch["status"], batch["id"]
            if status == "cancelling":
                await self._close(bid, "batch_cancelled", "The batch was cancelled before this request ran.",
                                  "cancelled", "cancelled_at")
            elif status == "in_progress" and now >= batch["expires_at"]:
                await self._close(bid, "batch_expired", "This request could not be executed before the completion "
                                  "window expired.", "expired", "expired_at")
            elif status == "finalizing" or await store.run(store.open_lines, bid) == 0:
                if status != "finalizing":
                    await store.run(store.set_status, bid, "finalizing", "finalizing_at")
                await store.run(store.finalize, bid, "completed", "completed_at")
        for alias in await store.run(store.queued_aliases):
            room = self._room(alias)
            if room > 0:
                for line in await store.run(store.claim, alias, room, self.id, time.time() + self.lease):
                    self._spawn(alias, line)

    def _room(self, alias: Optional[str]) -> int:
        """Lines of ``alias`` that may start now: its batch share less those running, and no more
        than the slots interactive requests leave free."""
        if self.paused.get(alias, 0) > time.monotonic():
            return 0
        cfg = self.settings.models.get(alias) if alias is not None else None
        if cfg is None:  # an unknown alias: each line is refused at once (model_not_found)
            return UNKNOWN_ALIAS_LINES - self.running[alias]
        slots = cfg.concurrency()
        share = max(1, int(slots * self.settings.batches.slot_share))
        # requests holding the alias now: interactive ones and the batch lines among them (the
        # manager's count, read only; lines claimed but not yet admitted are not in it yet)
        busy = max(self.manager._in_flight.get(alias, 0), self.running[alias])
        if busy > self.running[alias]:  # interactive requests are being served: one batch line at most
            share = 1
        return min(share - self.running[alias], slots - busy)

    def _spawn(self, alias: Optional[str], line: dict[str, Any]) -> None:
        key = (line["batch_id"], line["idx"])
        self.running[alias] += 1
        task = asyncio.create_task(self._run(alias, line))
        self.tasks[key] = task

        def done(_):
            self.tasks.pop(key, None)
            self.running[alias] -= 1
            self.wake.set()

        task.add_done_callback(done)

    async def _run(self, alias: Optional[str], line: dict[str, Any]) -> None:
        MAY_LOAD.set(bool(line["may_load"]))  # what the batch's key may load on demand (this task's context)
        status, body = await self.batches.answer(line["endpoint"], json.loads(line["body"]))
        if status in (429, 503) and line["attempts"] < MAX_ATTEMPTS:
            self.paused[alias] = time.monotonic() + 1.0
            await self.store.run(self.store.requeue, self.id, line["batch_id"], line["idx"])
            return
        result = result_line(new_id("batch_req_"), line["custom_id"],
                             {"status_code": status, "request_id": new_id("req_"), "body": body}, None)
        await self.store.run(self.store.finish, self.id, line["batch_id"], line["idx"], result, 200 <= status < 300,
                             _tokens(body))

    async def _cancel(self, keys: list[tuple[str, int]]) -> None:
        """Stops these lines' runs: their operations are cancelled, so the engines stop them."""
        tasks = [self.tasks[k] for k in keys if k in self.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close(self, batch_id: str, code: str, message: str, status: str, when: str) -> None:
        await self._cancel([k for k in self.tasks if k[0] == batch_id])
        await self.store.run(self.store.close_open_lines, batch_id, code, message)
        await self.store.run(self.store.finalize, batch_id, status, when)
        log.info("batch %s %s", batch_id, status)

    async def _validate(self, batch: dict[str, Any]) -> None:
        data = await self.store.run(self.store.input_text, batch)
        lines, errors = await self.store.run(self._parse, batch["endpoint"], data)
        if errors:
            await self.store.run(self.store.fail, batch["id"], errors)
            log.info("batch %s failed validation: %s", batch["id"], errors[0]["message"])
            return
        await self.store.run(self.store.start, batch["id"], lines, lines[0][2])

    def _parse(self, endpoint: str, data: Optional[bytes]) -> tuple[list[tuple], list[dict[str, Any]]]:
        """The lines (idx, custom_id, alias, body JSON) of an input file, or the errors that fail it."""
        if data is None:
            return [], [_error("file_not_found", "The input file was deleted before the batch read it.",
                               param="input_file_id")]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return [], [_error("invalid_file", f"The input file is not UTF-8 text ({exc}).")]
        lines, errors, seen = [], [], set()
        numbered = [(n, t) for n, t in enumerate(text.splitlines(), 1) if t.strip()]
        limit = self.settings.batches.max_lines
        if not numbered:
            return [], [_error("empty_file", "The input file holds no requests.")]
        if len(numbered) > limit:
            return [], [_error("too_many_requests", f"The input file holds {len(numbered)} requests; at most {limit} "
                               "per batch (batches.max_lines).")]
        for n, raw in numbered:
            try:
                line = InputLine.model_validate_json(raw)
            except ValidationError as exc:
                err = validation_error_to_api_error(list(exc.errors()))
                errors.append(_error(err.code or "invalid_request", f"Line {n}: {err.message}", n, err.param))
            else:
                if line.url != endpoint:
                    errors.append(_error("mismatched_endpoint", f"Line {n}: url {line.url!r} is not the batch's "
                                         f"endpoint {endpoint!r}.", n, "url"))
                elif line.custom_id in seen:
                    errors.append(_error("duplicate_custom_id", f"Line {n}: custom_id {line.custom_id!r} appears more "
                                         "than once; each request needs its own.", n, "custom_id"))
                seen.add(line.custom_id)
                lines.append((len(lines), line.custom_id, self.batches.alias_of(endpoint, line.body),
                              json.dumps(line.body)))
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
        return lines, errors


def _error(code: str, message: str, line: Optional[int] = None, param: Optional[str] = None) -> dict[str, Any]:
    return BatchError(code=code, message=message, line=line, param=param).model_dump()


def _tokens(body: dict[str, Any]) -> tuple[int, int]:
    """A line's (input, output) tokens, from its answer's usage (chat, completions, embeddings or
    Responses fields)."""
    u = body.get("usage") or {}
    return (int(u.get("prompt_tokens", u.get("input_tokens", 0)) or 0),
            int(u.get("completion_tokens", u.get("output_tokens", 0)) or 0))


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return FileObject(id=row["id"], bytes=row["bytes"], created_at=row["created_at"], filename=row["filename"],
                      purpose=row["purpose"]).model_dump()


def batch_object(row: dict[str, Any]) -> dict[str, Any]:
    errors = json.loads(row["errors"]) if row.get("errors") else None
    tokens = row["tokens"]
    return Batch(id=row["id"], endpoint=row["endpoint"], input_file_id=row["input_file_id"],
                 completion_window=row["completion_window"], status=row["status"], model=row.get("model"),
                 errors=BatchErrors(data=errors) if errors else None, output_file_id=row.get("output_file_id"),
                 error_file_id=row.get("error_file_id"), request_counts=RequestCounts(**row["counts"]),
                 metadata=json.loads(row["metadata"]) if row.get("metadata") else None,
                 usage=usage(*tokens), **batch_times(row)).model_dump()

