"""SQLite (WAL) metadata for files, containers and container files; blobs live beside it on disk."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from smolrun.errors import StorageFull

# Append-only: each entry upgrades the schema by one version (PRAGMA user_version).
MIGRATIONS = (
    """
    CREATE TABLE files (
        id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE containers (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at INTEGER NOT NULL, last_active_at INTEGER NOT NULL,
        status TEXT NOT NULL, expires_minutes INTEGER NOT NULL, memory_limit TEXT NOT NULL
    );
    CREATE TABLE container_files (
        id TEXT PRIMARY KEY, container_id TEXT NOT NULL REFERENCES containers(id), path TEXT NOT NULL,
        bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, source TEXT NOT NULL, UNIQUE (container_id, path)
    );
    """,
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, body TEXT NOT NULL, input_items TEXT NOT NULL,
        context TEXT NOT NULL, container_id TEXT
    );
    """,
)


@contextmanager
def _full_disk() -> Iterator[None]:
    """SQLite's "database or disk is full" as StorageFull (507), its other errors as they are."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc):
            raise StorageFull("the server's data directory is full: delete files or responses, or free disk "
                              "space") from exc
        raise


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.transaction() as db:
                for statement in filter(str.strip, script.split(";")):  # executescript would commit
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={number}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, _full_disk():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                with suppress(sqlite3.Error):  # a failed write on a full disk may have rolled back already
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return dict(row) if row is not None else None

    def all(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def execute(self, sql: str, *args: Any) -> None:
        with self.transaction() as db:
            db.execute(sql, args)

    def close(self) -> None:
        with self._lock:
            self._db.close()
