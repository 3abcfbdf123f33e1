"""A container's quota tmpfs moved to disk (a server that stops) and back (its resume), and the states a
process killed half-way leaves, which the next start settles."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from smolrun.sandbox import storage
from smolrun.sandbox.files import listing
from tests.sandbox.conftest import mounts_under, needs_mount

pytestmark = needs_mount


@pytest.fixture()
def directory(tmp_path: Path) -> Iterator[Path]:
    """A container's directory; whatever a failing test left mounted under it is unmounted afterwards."""
    yield tmp_path / "cntr_test"
    for point in reversed(mounts_under(tmp_path)):
        ctypes.CDLL(None, use_errno=True).umount2(os.fsencode(point), storage.MNT_DETACH)


def _mount(workdir: Path, files: int = 50, megabytes: int = 8) -> Path:
    workdir.mkdir(parents=True)
    assert storage.mount_quota(workdir, files, megabytes, None)
    return workdir


def _fill(workdir: Path) -> None:
    (workdir / "sub").mkdir()
    (workdir / "sub" / "table.csv").write_bytes(b"x,y\n" * 1000)
    (workdir / "notes.txt").write_text("kept")
    os.symlink("/etc/shadow", workdir / "planted")
    os.mkfifo(workdir / "pipe")
    os.utime(workdir / "notes.txt", ns=(1_600_000_000_000_000_001, 1_600_000_000_000_000_001))


def test_persist_moves_the_files_to_disk_and_restore_into_a_fresh_tmpfs(directory: Path) -> None:
    workdir = _mount(directory / "data")
    _fill(workdir)
    before = listing(workdir, 100)
    assert storage.persist(directory) is True
    assert mounts_under(directory) == [] and os.listdir(directory) == ["data"]
    assert listing(workdir, 100) == before
    assert os.readlink(workdir / "planted") == "/etc/shadow" and (workdir / "notes.txt").read_text() == "kept"
    assert storage.restore(directory, 40, 4, None) is True  # the quota of the config resuming it
    assert mounts_under(directory) == [str(workdir)] and os.listdir(directory) == ["data"]
    assert listing(workdir, 100) == before
    quota = os.statvfs(workdir)
    assert (quota.f_files, quota.f_blocks * quota.f_frsize) == (41, 4 << 20)


def test_files_that_do_not_fit_on_disk_stay_mounted_and_nothing_is_lost(tmp_path: Path, directory: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    disk = _mount(tmp_path / "disk", megabytes=1)  # a full disk: 1 MiB for 2 MiB of files
    directory = disk / "cntr_test"
    workdir = _mount(directory / "data")
    (workdir / "big.bin").write_bytes(b"\x07" * (2 << 20))
    with caplog.at_level(logging.WARNING, logger="smolrun"):
        assert storage.persist(directory) is False
    assert mounts_under(directory) == [str(workdir)] and os.listdir(directory) == ["data"]  # no kept.tmp
    assert (workdir / "big.bin").read_bytes() == b"\x07" * (2 << 20)
    assert [r.getMessage() for r in caplog.records] == [
        f"container cntr_test keeps its files in memory, in the tmpfs at {workdir}: moving them to disk failed: "
        "[Errno 28] No space left on device"]


def test_a_copy_under_way_is_garbage_and_the_tmpfs_stays(directory: Path) -> None:
    workdir = _mount(directory / "data")
    (workdir / "notes.txt").write_text("the files")
    (directory / storage.COPYING / "sub").mkdir(parents=True)  # a persist killed while it copied
    (directory / storage.COPYING / "notes.txt").write_text("half a copy")
    storage.recover(directory)
    assert os.listdir(directory) == ["data"] and mounts_under(directory) == [str(workdir)]
    assert (workdir / "notes.txt").read_text() == "the files"


def test_a_complete_copy_is_the_files_whatever_is_mounted(directory: Path) -> None:
    workdir = _mount(directory / "data")  # a persist killed before its unmount, or a restore before its commit
    (workdir / "notes.txt").write_text("half restored")
    (directory / storage.KEPT / "sub").mkdir(parents=True)
    (directory / storage.KEPT / "notes.txt").write_text("the files")
    storage.recover(directory)
    assert os.listdir(directory) == ["data"] and mounts_under(directory) == []
    assert sorted(os.listdir(workdir)) == ["notes.txt", "sub"] and (workdir / "notes.txt").read_text() == "the files"


def test_a_complete_copy_without_a_work_dir_becomes_it(directory: Path) -> None:
    (directory / storage.KEPT).mkdir(parents=True)  # a persist killed between removing `data` and its rename
    (directory / storage.KEPT / "notes.txt").write_text("the files")
    storage.recover(directory)
    assert os.listdir(directory) == ["data"] and (directory / "data" / "notes.txt").read_text() == "the files"
