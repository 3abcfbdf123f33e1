"""Sandbox uids are unique on the host: two smolrun processes never hand out the same one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from smolrun.errors import SandboxUnavailable
from smolrun.sandbox.container import _Uids


def test_two_allocators_never_share_a_uid_and_a_returned_one_is_reused(tmp_path: Path) -> None:
    a, b = _Uids(tmp_path, first=500, count=3), _Uids(tmp_path, first=500, count=3)  # as two processes would
    assert [a.take(), b.take(), a.take()] == [500, 501, 502]
    with pytest.raises(SandboxUnavailable, match="all 3 sandbox uids from 500 are in use"):
        b.take()
    a.give_back(500)
    assert b.take() == 500


def test_a_uid_held_by_another_process_is_skipped_until_that_process_ends(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from smolrun.sandbox.container import _Uids; "
            f"u = _Uids(Path({str(tmp_path)!r}), first=700, count=2); print(u.take(), flush=True); sys.stdin.read()")
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "700"
            assert _Uids(tmp_path, first=700, count=2).take() == 701
        finally:
            holder.kill()
    assert _Uids(tmp_path, first=700, count=2).take() == 700  # the kernel released the dead holder's lock
