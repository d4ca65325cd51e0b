"""Stored responses of the Responses API, in an embedded SQLite file.

A stored response is the Response object the client got plus the conversation that led to it
(its input items after those of the responses it continued), so ``previous_response_id``
continues a conversation across requests and across server restarts. The file is bounded by
count and age (``responses:`` in configuration.yaml): each write drops rows older than
``max_age_days`` and the oldest rows past ``max_stored``; reads treat expired rows as gone.

Every call runs on the store's own thread (sqlite_store.py).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .sqlite_store import SQLiteStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    response TEXT NOT NULL,      -- the Response object, JSON
    conversation TEXT NOT NULL   -- the input items that led to it, JSON list
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
"""


def default_path() -> Path:
    """``$XDG_DATA_HOME/llmserve/responses.sqlite3``, else ``~/.local/share/llmserve/...``."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "llmserve" / "responses.sqlite3"


@dataclass
class StoredResponse:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]


class ResponseStore(SQLiteStore):
    SCHEMA = SCHEMA

    def __init__(self, path: Path, max_stored: int, max_age: float):
        super().__init__(path, "response-store")
        self.max_stored, self.max_age = max_stored, max_age

    async def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        await self.run(self._put, response["id"], json.dumps(response), json.dumps(conversation))

    async def get(self, response_id: str) -> Optional[StoredResponse]:
        row = await self.run(self._get, response_id)
        return None if row is None else StoredResponse(json.loads(row[0]), json.loads(row[1]))

    async def delete(self, response_id: str) -> bool:
        return await self.run(self._delete, response_id)

    # -- on the store's thread -----------------------------------------------------------------
    def _put(self, response_id: str, response: str, conversation: str) -> None:
        db, now = self._conn(), time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)", (response_id, now, response, conversation))
            db.execute("DELETE FROM responses WHERE created_at < ?", (now - self.max_age,))
            db.execute("DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY created_at DESC "
                       "LIMIT -1 OFFSET ?)", (self.max_stored,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _get(self, response_id: str) -> Optional[tuple[str, str]]:
        return self._conn().execute("SELECT response, conversation FROM responses WHERE id = ? AND created_at >= ?",
                                    (response_id, time.time() - self.max_age)).fetchone()

    def _delete(self, response_id: str) -> bool:
        return self._conn().execute("DELETE FROM responses WHERE id = ? AND created_at >= ?",
                                    (response_id, time.time() - self.max_age)).rowcount > 0
