"""Stored containers and their files: the rows behind the Containers API (sandbox/manager.py runs them).

A container's status is 'active', 'expired' (idle past its `expires_minutes`; its files are gone) or
'deleted'; only active ones have files. Times are Unix seconds. Rows are returned as plain dicts of their
columns (see store.py's schema).
"""

from __future__ import annotations

from typing import Any, Literal

from smolrun.store import Store

Order = Literal["asc", "desc"]


class ContainerStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, container_id: str, name: str, now: int, expires_minutes: int, memory_limit: str) -> None:
        self.store.execute("INSERT INTO containers VALUES (?, ?, ?, ?, 'active', ?, ?)", container_id, name, now,
                           now, expires_minutes, memory_limit)

    def get(self, container_id: str) -> dict[str, Any] | None:
        """The container's row, unless it was deleted."""
        return self.store.one("SELECT * FROM containers WHERE id = ? AND status != 'deleted'", container_id)

    def ids(self, order: Order, name: str | None = None) -> list[str]:
        """Containers not deleted (only those called `name`, if given), oldest first for "asc"."""
        direction = "ASC" if order == "asc" else "DESC"
        rows = self.store.all(f"SELECT id FROM containers WHERE status != 'deleted' AND (? IS NULL OR name = ?) "
                              f"ORDER BY created_at {direction}, rowid {direction}", name, name)
        return [r["id"] for r in rows]

    def active(self) -> list[dict[str, Any]]:
        """id, last_active_at and expires_minutes of every active container."""
        return self.store.all("SELECT id, last_active_at, expires_minutes FROM containers WHERE status = 'active'")

    def touch(self, container_id: str, now: int) -> None:
        self.store.execute("UPDATE containers SET last_active_at = ? WHERE id = ?", now, container_id)

    def end(self, container_id: str, status: Literal["expired", "deleted"]) -> None:
        """The container is over: its files are forgotten, in one transaction with its new status."""
        with self.store.transaction() as db:
            db.execute("DELETE FROM container_files WHERE container_id = ?", (container_id,))
            db.execute("UPDATE containers SET status = ? WHERE id = ?", (status, container_id))

    # -- its files ----------------------------------------------------------------------------------------

    def file(self, container_id: str, file_id: str) -> dict[str, Any] | None:
        return self.store.one("SELECT * FROM container_files WHERE id = ? AND container_id = ?", file_id,
                              container_id)

    def file_id(self, container_id: str, path: str) -> str | None:
        row = self.store.one("SELECT id FROM container_files WHERE container_id = ? AND path = ?", container_id, path)
        return None if row is None else str(row["id"])

    def paths(self, container_id: str) -> dict[str, str]:
        """path -> file id, for every file of the container."""
        rows = self.store.all("SELECT id, path FROM container_files WHERE container_id = ?", container_id)
        return {r["path"]: r["id"] for r in rows}

    def file_ids(self, container_id: str, order: Order) -> list[str]:
        direction = "ASC" if order == "asc" else "DESC"
        rows = self.store.all(f"SELECT id FROM container_files WHERE container_id = ? "
                              f"ORDER BY created_at {direction}, rowid {direction}", container_id)
        return [r["id"] for r in rows]

    def add_file(self, file_id: str, container_id: str, path: str, size: int, now: int, source: str) -> None:
        self.store.execute("INSERT INTO container_files VALUES (?, ?, ?, ?, ?, ?)", file_id, container_id, path,
                           size, now, source)

    def resize_file(self, file_id: str, size: int) -> None:
        self.store.execute("UPDATE container_files SET bytes = ? WHERE id = ?", size, file_id)

    def drop_file(self, file_id: str) -> None:
        self.store.execute("DELETE FROM container_files WHERE id = ?", file_id)
