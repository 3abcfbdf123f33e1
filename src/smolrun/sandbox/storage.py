"""A container's work directory: a tmpfs whose size and inode count are the quota, where the host may mount.

With the tmpfs, the kernel enforces the file and byte quota while code runs (the write that passes it
fails with ENOSPC), for background processes too, and removing a container is one unmount however many
files it made. Without the right to mount (not root, or a container runtime that forbids it), the work
dir is a plain directory and the quota is checked by a bounded walk during and after each call.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def mount_quota(workdir: Path, files: int, megabytes: int, uid: int | None) -> bool:
    """Mount a tmpfs of `megabytes` holding at most `files` entries at `workdir`; False where not allowed."""
    if os.geteuid() != 0:
        return False
    # nr_inodes counts the tmpfs root too.
    options = f"size={megabytes}m,nr_inodes={files + 1},mode=0700"
    if uid is not None:
        options += f",uid={uid},gid={uid}"
    done = _libc().mount(b"tmpfs", os.fsencode(workdir), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode())
    return bool(done == 0)


def is_full(workdir: Path) -> bool:
    """Whether a quota tmpfs has no inode or no block left."""
    info = os.statvfs(workdir)
    return info.f_favail == 0 or info.f_bavail == 0


def release(directory: Path, workdir: Path) -> None:
    """Unmount the work dir if it is a mount, then remove the container's directory."""
    _libc().umount2(os.fsencode(workdir), MNT_DETACH)  # EINVAL when it is no mount point: nothing to do
    shutil.rmtree(directory, ignore_errors=True)
