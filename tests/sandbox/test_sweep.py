"""What a killed smolrun left under the sandbox root is removed at the next start; live containers stay."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from smolrun.sandbox.container import OWNER_LOCK, sweep_orphans


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
