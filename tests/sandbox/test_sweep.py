"""What a killed smolrun left under the sandbox root is removed at the next start, or moved from its tmpfs to
disk where a server may resume it; live containers stay."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from smolrun.sandbox import storage
from smolrun.sandbox.container import OWNER_LOCK, OWNER_STORE, sweep_orphans
from smolrun.sandbox.files import listing
from tests.sandbox.conftest import mounts_under, needs_mount


def _container(root: Path, name: str, age_s: float = 0.0, lock: bool = True) -> Path:
    directory = root / name
    (directory / "data").mkdir(parents=True)
    (directory / "data" / "f.csv").write_text("x")
    if lock:
        (directory / OWNER_LOCK).touch()
    then = time.time() - age_s
    os.utime(directory, (then, then))
    return directory


def test_only_directories_nobody_owns_are_removed(tmp_path: Path) -> None:
    dead = _container(tmp_path, "cntr_dead")  # its owner died: the lock is free
    live = _container(tmp_path, "cntr_live")
    held = os.open(live / OWNER_LOCK, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    starting = _container(tmp_path, "cntr_starting", lock=False)  # just made, its lock not yet
    stale = _container(tmp_path, "cntr_stale", age_s=120, lock=False)  # a process died before its lock
    other = tmp_path / "not-a-container"
    other.mkdir()
    try:
        assert sweep_orphans(tmp_path) == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cntr_live", "cntr_starting", "not-a-container"]
        assert (live / "data" / "f.csv").read_text() == "x" and starting.is_dir()
        assert not dead.exists() and not stale.exists()
    finally:
        os.close(held)


def test_a_lock_held_by_another_process_keeps_its_directory_until_that_process_dies(tmp_path: Path) -> None:
    directory = _container(tmp_path, "cntr_other")
    code = (f"import fcntl, os, sys; fd = os.open({str(directory / OWNER_LOCK)!r}, os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()")
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            assert sweep_orphans(tmp_path) == 0 and directory.is_dir()
        finally:
            holder.kill()
    assert sweep_orphans(tmp_path) == 1 and not directory.exists()


def _mounted(root: Path, name: str, store: Path | None = None) -> Path:
    """A container directory as a killed server left it: its quota tmpfs mounted, with files, its lock free."""
    workdir = root / name / "data"
    workdir.mkdir(parents=True)
    (root / name / OWNER_LOCK).touch()
    if store is not None:
        (root / name / OWNER_STORE).write_text(str(store))
    assert storage.mount_quota(workdir, 50, 4, None)
    (workdir / "sub").mkdir()
    (workdir / "sub" / "f.csv").write_text(f"the files of {name}")
    os.symlink("/etc/shadow", workdir / "planted")
    return workdir


@needs_mount
def test_a_dead_servers_tmpfs_goes_to_disk_where_a_server_may_resume_it_and_is_removed_where_not(
        tmp_path: Path) -> None:
    root = tmp_path / "containers"
    mine, theirs, gone = tmp_path / "mine.db", tmp_path / "theirs.db", tmp_path / "gone.db"
    theirs.touch()
    kept = _mounted(root, "cntr_kept", mine)  # the caller's own, kept across its restart
    other = _mounted(root, "cntr_other", theirs)  # another server's, whose store still exists
    orphans = [_mounted(root, "cntr_warm"), _mounted(root, "cntr_lost", gone)]  # never registered; store gone
    live = _mounted(root, "cntr_live", theirs)
    held = os.open(live.parent / OWNER_LOCK, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    before = {w: listing(w, 50) for w in (kept, other, live)}
    try:
        assert sweep_orphans(root, frozenset({"cntr_kept"}), mine) == 2
        assert mounts_under(root) == [str(live)]
        assert sorted(p.name for p in root.iterdir()) == ["cntr_kept", "cntr_live", "cntr_other"]
        assert not any(o.parent.exists() for o in orphans)
        for workdir in (kept, other):
            assert sorted(os.listdir(workdir.parent)) == ["data", OWNER_LOCK, OWNER_STORE]
            assert listing(workdir, 50) == before[workdir] and os.readlink(workdir / "planted") == "/etc/shadow"
        assert listing(live, 50) == before[live]
    finally:
        os.close(held)
        for point in reversed(mounts_under(tmp_path)):
            storage.release(Path(point).parent, Path(point))
