"""A full data directory: clear 507s in OpenAI's shape, nothing half-written, and deletes that free space
(issue 14, item 8). The data directory is a small tmpfs, so the disk really fills (root only)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from smolrun.engine import Engine
from tests.fakes import TurnsModel

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs as the data directory needs root")


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(data)], check=True)
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=True)


def upload(url: str, name: str, size: int) -> httpx.Response:
    return httpx.post(f"{url}/files", files={"file": (name, b"x" * size)}, data={"purpose": "assistants"},
                      timeout=30)


def test_uploads_on_a_full_disk_are_507_leave_nothing_and_deletes_free_space(make_server, small_disk: Path) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(TurnsModel(b"ok")), data_dir=small_disk)
    kept = upload(server.url, "kept.bin", 400_000)
    assert kept.status_code == 200
    too_big = upload(server.url, "big.bin", 900_000)
    assert (too_big.status_code, too_big.json()["error"]["code"], too_big.json()["error"]["type"]) == (
        507, "insufficient_storage", "server_error")
    assert "big.bin does not fit" in too_big.json()["error"]["message"]
    assert [p.name for p in (small_disk / "files").iterdir()] == [kept.json()["id"]]  # no orphan blob
    listed = httpx.get(f"{server.url}/files", timeout=30).json()["data"]
    assert [f["filename"] for f in listed] == ["kept.bin"]  # no row without its blob either
    deleted = httpx.delete(f"{server.url}/files/{kept.json()['id']}", timeout=30)
    assert (deleted.status_code, deleted.json()["deleted"]) == (200, True)
    assert upload(server.url, "fits-now.bin", 600_000).status_code == 200
