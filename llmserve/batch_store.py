"""Files and batches of the Batch API, in an embedded SQLite file beside the stored responses,
the file contents in a folder beside it.

A batch's input file becomes, once validated, a queue of lines (table ``lines``): each line is
``queued``, ``running`` (claimed by one runner, on a lease it renews while it lives) or ``done``
with its result. A result is committed before it counts (request_counts are read from this table),
and only by the runner that holds the line, so a server killed mid-batch loses only the lines it
was running: once their lease runs out they are queued again (for the next start, or for another
server process on the same store), and a ``done`` line is never run twice. Every row has an owner (a hash of the API key that made it, "" with no keys)
and the client-facing reads see their owner's rows only.

Every call runs on the store's own thread (sqlite_store.py).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

from .batch_schemas import TERMINAL, result_line
from .errors import APIError, InvalidRequest
from .sqlite_store import SQLiteStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    purpose TEXT NOT NULL,          -- batch (uploads), batch_output (results)
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    metadata TEXT,                  -- JSON object or NULL
    may_load INTEGER NOT NULL,      -- whether its key could load a model on demand
    status TEXT NOT NULL,
    model TEXT,
    errors TEXT,                    -- JSON list of BatchError, a failed validation's
    output_file_id TEXT,
    error_file_id TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
    expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER
);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL,
    idx INTEGER NOT NULL,           -- 0-based line of the input file
    custom_id TEXT NOT NULL,
    alias TEXT,                     -- the model it names (None: not a string, the run refuses it)
    body TEXT NOT NULL,
    state TEXT NOT NULL,            -- queued, running, done
    runner TEXT,                    -- the runner (one per server process) running it
    lease REAL,                     -- until when that runner holds it (renewed while it lives)
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,                    -- JSON: the output / error file line
    ok INTEGER,                     -- 1: answered 2xx (output file), 0: error file
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, idx)
);
CREATE INDEX IF NOT EXISTS lines_by_state ON lines (state, alias);
"""

_TIMES = ("created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
          "cancelling_at", "cancelled_at")


def default_path() -> Path:
    """``$XDG_DATA_HOME/llmserve/batches.sqlite3``, else ``~/.local/share/llmserve/...``."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "llmserve" / "batches.sqlite3"


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def not_found(kind: str, param: str, ident: str) -> APIError:
    return APIError(f"No {kind} with id {ident!r} (it never existed, was deleted, or belongs to another API key).",
                    status=404, param=param, code="not_found")


class BatchStore(SQLiteStore):
    SCHEMA = SCHEMA
    SYNCHRONOUS = "FULL"  # a line's committed result survives a power cut too

    def __init__(self, path: Path, files_dir: Path, max_files: int):
        super().__init__(path, "batch-store")
        self.files_dir, self.max_files = Path(files_dir), max_files

    def blob(self, file_id: str) -> Path:
        return self.files_dir / file_id

    # -- on the store's thread: connection and transactions ----------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.files_dir.mkdir(parents=True, exist_ok=True)
            super()._conn().row_factory = sqlite3.Row
        return self._db

    def _write(self, fn, *args):
        """``fn(db, *args)`` in one transaction."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db, *args)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return result

    # -- files ----------------------------------------------------------------------------------
    def add_file(self, owner: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        """Writes an upload (its bytes made durable first), refused past max_files uploads."""
        file_id = new_id("file-")
        path = self.blob(file_id)
        self._conn()
        _durable_write(path, data)
        try:
            return self._write(self._add_file, file_id, owner, filename, purpose, len(data))
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def _add_file(self, db, file_id, owner, filename, purpose, size) -> dict[str, Any]:
        if purpose == "batch":
            kept = db.execute("SELECT COUNT(*) FROM files WHERE purpose = 'batch'").fetchone()[0]
            if kept >= self.max_files:
                raise InvalidRequest(f"This server keeps at most {self.max_files} uploaded files (batches.max_files); "
                                     "delete some (DELETE /v1/files/{id}) before uploading another.",
                                     param="file", code="too_many_files")
        row = dict(id=file_id, owner=owner, purpose=purpose, filename=filename, bytes=size, created_at=int(time.time()))
        db.execute("INSERT INTO files VALUES (:id, :owner, :purpose, :filename, :bytes, :created_at)", row)
        return row

    def get_file(self, owner: str, file_id: str) -> dict[str, Any]:
        row = self._conn().execute("SELECT * FROM files WHERE id = ? AND owner = ?", (file_id, owner)).fetchone()
        if row is None:
            raise not_found("file", "file_id", file_id)
        return dict(row)

    def list_files(self, owner: str, purpose: Optional[str], after: Optional[str], limit: int, order: str
                   ) -> tuple[list[dict[str, Any]], bool]:
        where, args = ["owner = ?"], [owner]
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        return self._page("files", where, args, after, limit, order)

    def delete_file(self, owner: str, file_id: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM files WHERE id = ?", (self.get_file(owner, file_id)["id"],)))
        self.blob(file_id).unlink(missing_ok=True)

    def _page(self, table: str, where: list[str], args: list, after: Optional[str], limit: int, order: str
              ) -> tuple[list[dict[str, Any]], bool]:
        """One page of ``table`` in rowid order (creation order), after the row with id ``after``."""
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        if after:
            where = where + [f"rowid {op} (SELECT rowid FROM {table} WHERE id = ?)"]
            args = args + [after]
        rows = self._conn().execute(f"SELECT * FROM {table} WHERE {' AND '.join(where)} ORDER BY rowid {direction} "
                                    "LIMIT ?", (*args, limit + 1)).fetchall()
        return [dict(r) for r in rows[:limit]], len(rows) > limit

    # -- batches: the client's side ---------------------------------------------------------------
    def create_batch(self, owner: str, req, window: int, may_load: bool) -> dict[str, Any]:
        return self._write(self._create_batch, owner, req, window, may_load)

    def _create_batch(self, db, owner, req, window, may_load) -> dict[str, Any]:
        source = db.execute("SELECT purpose FROM files WHERE id = ? AND owner = ?", (req.input_file_id, owner)).fetchone()
        if source is None:
            raise not_found("file", "input_file_id", req.input_file_id)
        if source["purpose"] != "batch":
            raise InvalidRequest(f"File {req.input_file_id!r} has purpose {source['purpose']!r}; a batch reads a file "
                                 "uploaded with purpose \"batch\".", param="input_file_id", code="invalid_file")
        now = int(time.time())
        row = dict(id=new_id("batch_"), owner=owner, endpoint=req.endpoint, input_file_id=req.input_file_id,
                   completion_window=req.completion_window, may_load=int(may_load), status="validating",
                   metadata=None if req.metadata is None else json.dumps(req.metadata), created_at=now,
                   expires_at=now + window)
        db.execute("INSERT INTO batches (id, owner, endpoint, input_file_id, completion_window, metadata, may_load, "
                   "status, created_at, expires_at) VALUES (:id, :owner, :endpoint, :input_file_id, "
                   ":completion_window, :metadata, :may_load, :status, :created_at, :expires_at)", row)
        return row

    def get_batch(self, owner: Optional[str], batch_id: str) -> dict[str, Any]:
        """A batch row with its live counts; owner None: whoever owns it (the runner)."""
        db = self._conn()
        row = db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None or (owner is not None and row["owner"] != owner):
            raise not_found("batch", "batch_id", batch_id)
        return self._with_counts(db, dict(row))

    def list_batches(self, owner: str, after: Optional[str], limit: int) -> tuple[list[dict[str, Any]], bool]:
        rows, more = self._page("batches", ["owner = ?"], [owner], after, limit, "desc")
        db = self._conn()
        return [self._with_counts(db, r) for r in rows], more

    @staticmethod
    def _with_counts(db, row: dict[str, Any]) -> dict[str, Any]:
        counts = db.execute("SELECT COUNT(*), COALESCE(SUM(ok = 1), 0), COALESCE(SUM(ok = 0), 0), "
                            "COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) FROM lines "
                            "WHERE batch_id = ?", (row["id"],)).fetchone()
        row["counts"] = {"total": counts[0], "completed": counts[1], "failed": counts[2]}
        row["tokens"] = (counts[3], counts[4])
        return row

    def cancel(self, owner: str, batch_id: str) -> dict[str, Any]:
        def cancel(db):
            row = self.get_batch(owner, batch_id)
            if row["status"] in TERMINAL or row["status"] == "finalizing":
                raise APIError(f"Batch {batch_id!r} is {row['status']}; only a validating or in_progress batch can be "
                               "cancelled.", status=409, param="batch_id", code="batch_not_cancellable")
            if row["status"] != "cancelling":
                db.execute("UPDATE batches SET status = 'cancelling', cancelling_at = ? WHERE id = ?",
                           (int(time.time()), batch_id))

        self._write(cancel)
        return self.get_batch(owner, batch_id)

    # -- batches: the runner's side ---------------------------------------------------------------
    def batches_in(self, statuses: Iterable[str]) -> list[dict[str, Any]]:
        statuses = list(statuses)
        rows = self._conn().execute(f"SELECT * FROM batches WHERE status IN ({','.join('?' * len(statuses))}) "
                                    "ORDER BY rowid", statuses).fetchall()
        return [dict(r) for r in rows]

    def input_text(self, batch: dict[str, Any]) -> Optional[bytes]:
        try:
            return self.blob(batch["input_file_id"]).read_bytes()
        except FileNotFoundError:  # deleted before it was read
            return None

    def start(self, batch_id: str, lines: list[tuple[int, str, Optional[str], str]], model: Optional[str]) -> None:
        """A validated batch's lines (idx, custom_id, alias, body JSON) queued, and it in_progress."""
        def start(db):
            db.executemany("INSERT OR IGNORE INTO lines (batch_id, idx, custom_id, alias, body, state) "
                           "VALUES (?, ?, ?, ?, ?, 'queued')", [(batch_id, *line) for line in lines])
            db.execute("UPDATE batches SET status = 'in_progress', in_progress_at = ?, model = ? WHERE id = ? AND "
                       "status = 'validating'", (int(time.time()), model, batch_id))

        self._write(start)

    def fail(self, batch_id: str, errors: list[dict[str, Any]]) -> None:
        self._write(lambda db: db.execute("UPDATE batches SET status = 'failed', failed_at = ?, errors = ? WHERE id = ? "
                                          "AND status = 'validating'", (int(time.time()), json.dumps(errors), batch_id)))

    def renew(self, runner: str, lease: float) -> int:
        """Keeps this runner's lines, and queues again the lines of runners whose lease ran out
        (a process killed mid-line); the number queued again."""
        def renew(db):
            db.execute("UPDATE lines SET lease = ? WHERE state = 'running' AND runner = ?", (lease, runner))
            return db.execute("UPDATE lines SET state = 'queued', runner = NULL WHERE state = 'running' AND lease < ?",
                              (time.time(),)).rowcount

        return self._write(renew)

    def release(self, runner: str) -> None:
        """At a clean stop: this runner's lines queued again at once."""
        self._write(lambda db: db.execute("UPDATE lines SET state = 'queued', runner = NULL WHERE state = 'running' "
                                          "AND runner = ?", (runner,)))

    def queued_aliases(self) -> list[Optional[str]]:
        return [r[0] for r in self._conn().execute(
            "SELECT DISTINCT alias FROM lines WHERE state = 'queued' AND batch_id IN "
            "(SELECT id FROM batches WHERE status = 'in_progress')")]

    def claim(self, alias: Optional[str], n: int, runner: str, lease: float) -> list[dict[str, Any]]:
        """Up to ``n`` queued lines naming ``alias``, oldest batch first, now ``runner``'s."""
        def claim(db):
            rows = db.execute("SELECT l.batch_id, l.idx, l.custom_id, l.body, l.attempts, b.endpoint, b.may_load "
                              "FROM lines l JOIN batches b ON b.id = l.batch_id WHERE l.state = 'queued' AND "
                              "l.alias IS ? AND b.status = 'in_progress' ORDER BY b.rowid, l.idx LIMIT ?",
                              (alias, n)).fetchall()
            db.executemany("UPDATE lines SET state = 'running', runner = ?, lease = ?, attempts = attempts + 1 "
                           "WHERE batch_id = ? AND idx = ?", [(runner, lease, r["batch_id"], r["idx"]) for r in rows])
            return [dict(r) for r in rows]

        return self._write(claim)

    def finish(self, runner: str, batch_id: str, idx: int, result: dict[str, Any], ok: bool,
               tokens: tuple[int, int]) -> bool:
        """A line's result, committed; False when ``runner`` no longer held the line (closed by a
        cancel or an expiry meanwhile, or its lease lost), which keeps the one result it has."""
        return self._write(lambda db: db.execute(
            "UPDATE lines SET state = 'done', result = ?, ok = ?, prompt_tokens = ?, completion_tokens = ? "
            "WHERE batch_id = ? AND idx = ? AND state = 'running' AND runner = ?",
            (json.dumps(result), int(ok), *tokens, batch_id, idx, runner)).rowcount > 0)

    def requeue(self, runner: str, batch_id: str, idx: int) -> None:
        self._write(lambda db: db.execute("UPDATE lines SET state = 'queued', runner = NULL WHERE batch_id = ? AND "
                                          "idx = ? AND state = 'running' AND runner = ?", (batch_id, idx, runner)))

    def open_lines(self, batch_id: str) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM lines WHERE batch_id = ? AND state != 'done'",
                                    (batch_id,)).fetchone()[0]

    def close_open_lines(self, batch_id: str, code: str, message: str) -> None:
        """Every line not done yet gets an error line (batch_expired, batch_cancelled)."""
        def close(db):
            rows = db.execute("SELECT idx, custom_id FROM lines WHERE batch_id = ? AND state != 'done'",
                              (batch_id,)).fetchall()
            db.executemany("UPDATE lines SET state = 'done', ok = 0, result = ? WHERE batch_id = ? AND idx = ?",
                           [(json.dumps(result_line(new_id("batch_req_"), r["custom_id"], None,
                                                    {"code": code, "message": message})), batch_id, r["idx"])
                            for r in rows])

        self._write(close)

    def set_status(self, batch_id: str, status: str, when: str) -> None:
        self._write(lambda db: db.execute(f"UPDATE batches SET status = ?, {when} = ? WHERE id = ?",
                                          (status, int(time.time()), batch_id)))

    def finalize(self, batch_id: str, status: str, when: str) -> None:
        """The output and error files written from the lines' results (in input order), then, in one
        transaction, the files listed and the batch ``status``. Killed halfway, it runs again at the
        next start (the batch is still finalizing) and leaves at most an unlisted file behind."""
        db = self._conn()
        batch = self.get_batch(None, batch_id)
        kept = {1: [], 0: []}
        for r in db.execute("SELECT ok, result FROM lines WHERE batch_id = ? ORDER BY idx", (batch_id,)):
            kept[r["ok"]].append(r["result"])
        files = {}
        for ok, column, name in ((1, "output_file_id", "output"), (0, "error_file_id", "error")):
            if kept[ok]:
                file_id = new_id("file-")
                data = ("\n".join(kept[ok]) + "\n").encode()
                _durable_write(self.blob(file_id), data)
                files[column] = (file_id, f"{batch_id}_{name}.jsonl", len(data))

        def commit(db):
            now = db.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()["status"]
            if now in TERMINAL:  # another server process on this store closed it first
                return False
            for column, (file_id, filename, size) in files.items():
                db.execute("INSERT INTO files VALUES (?, ?, 'batch_output', ?, ?, ?)",
                           (file_id, batch["owner"], filename, size, int(time.time())))
                db.execute(f"UPDATE batches SET {column} = ? WHERE id = ?", (file_id, batch_id))
            db.execute(f"UPDATE batches SET status = ?, {when} = ? WHERE id = ?", (status, int(time.time()), batch_id))
            return True

        if not self._write(commit):
            for file_id, _, _ in files.values():
                self.blob(file_id).unlink(missing_ok=True)

    def sweep_blobs(self) -> None:
        """At start: file contents no row lists (a finalize or upload cut short) are removed, once
        an hour old (another server process on this store may be about to list its own)."""
        db = self._conn()
        listed = {r[0] for r in db.execute("SELECT id FROM files")}
        for path in self.files_dir.iterdir():
            if path.name.startswith("file-") and path.name not in listed and path.stat().st_mtime < time.time() - 3600:
                path.unlink(missing_ok=True)


def _durable_write(path: Path, data: bytes) -> None:
    """``data`` at ``path``, on disk before the name appears (written aside, synced, renamed)."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def batch_times(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row.get(k) for k in _TIMES}
