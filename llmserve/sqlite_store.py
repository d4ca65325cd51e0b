"""An embedded SQLite file served from one worker thread of its own: the base of the stores of
durable state (response_store.py, batch_store.py).

sqlite3 blocks, so every call runs on that thread (off the event loop; one connection, used from
that thread only). Several server processes may share the file: SQLite locks it, and WAL lets
readers go on while one writes.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional


class SQLiteStore:
    SCHEMA = ""  # the tables, created at the first connection
    SYNCHRONOUS = "NORMAL"  # WAL's default: a commit survives the process, FULL a power cut too

    def __init__(self, path: Path, thread_name: str):
        self.path = Path(path)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._db: Optional[sqlite3.Connection] = None

    async def run(self, fn, *args):
        """``fn(*args)`` on the store's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def close(self) -> None:
        def close_db():
            if self._db is not None:
                self._db.close()
                self._db = None

        self._thread.submit(close_db).result()
        self._thread.shutdown()

    def _conn(self) -> sqlite3.Connection:
        """The connection (on the store's thread), opened and its tables made at the first call."""
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None)  # autocommit; writes are one statement or BEGIN..COMMIT
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.SYNCHRONOUS}")
            db.executescript(self.SCHEMA)
            self._db = db
        return self._db
