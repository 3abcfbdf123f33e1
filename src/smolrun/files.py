"""The Files API's storage: uploaded files on disk, their metadata in the store."""

from __future__ import annotations

import errno
import os
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from smolrun.errors import InvalidRequest, NotFound, PayloadTooLarge, StorageFull
from smolrun.store import Store

PURPOSES = ("assistants", "assistants_output", "batch", "fine-tune", "fine-tune-results", "vision", "user_data",
            "evals")


def read_capped(stream: BinaryIO, max_bytes: int, what: str) -> bytes:
    """Read an upload, refusing it as soon as it passes `max_bytes` (never more is held in memory)."""
    chunks, total = [], 0
    while chunk := stream.read(1 << 20):
        total += len(chunk)
        if total > max_bytes:
            raise PayloadTooLarge(f"{what} is larger than the limit of {max_bytes} bytes", param="file")
        chunks.append(chunk)
    return b"".join(chunks)


class FileStore:
    def __init__(self, store: Store, directory: Path) -> None:
        self.store = store
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        if purpose not in PURPOSES:
            raise InvalidRequest(f"'purpose' must be one of {', '.join(PURPOSES)}", param="purpose")
        name = os.path.basename(filename.replace("\\", "/")) or "upload"
        file_id = f"file-{uuid.uuid4().hex}"
        blob = self.directory / file_id
        try:
            blob.write_bytes(data)
            self.store.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?)", file_id, name, purpose, len(data),
                               int(time.time()))
        except OSError as exc:  # never a blob without its row
            blob.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"{name} does not fit: the server's data directory is full; delete files or "
                                  "responses, or free disk space") from None
            raise
        except StorageFull:
            blob.unlink(missing_ok=True)
            raise
        return self.get(file_id)

    def get(self, file_id: str) -> dict[str, Any]:
        row = self.store.one("SELECT * FROM files WHERE id = ?", file_id)
        if row is None:
            raise NotFound(f"No such File object: {file_id}", param="file_id")
        # OpenAI's spec types `expires_at` as an integer and `status_details` as a string, never null: files
        # here do not expire and have no details, so both are left out.
        return {"object": "file", "status": "processed", **row}

    def content(self, file_id: str) -> tuple[dict[str, Any], bytes]:
        meta = self.get(file_id)
        return meta, (self.directory / file_id).read_bytes()

    def list_all(self, purpose: str | None, order: str) -> list[dict[str, Any]]:
        direction = "ASC" if order == "asc" else "DESC"
        rows = self.store.all(f"SELECT id FROM files WHERE ? IS NULL OR purpose = ? ORDER BY created_at {direction}, "
                              f"rowid {direction}", purpose, purpose)
        return [self.get(r["id"]) for r in rows]

    def delete(self, file_id: str) -> dict[str, Any]:
        self.get(file_id)
        (self.directory / file_id).unlink(missing_ok=True)  # first: on a full disk this frees the room to delete
        self.store.execute("DELETE FROM files WHERE id = ?", file_id)
        return {"id": file_id, "object": "file", "deleted": True}
