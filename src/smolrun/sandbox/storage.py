"""A container's work directory: a tmpfs whose size and inode count are the quota, where the host may mount.

With the tmpfs, the kernel enforces the file and byte quota while code runs (the write that passes it
fails with ENOSPC), for background processes too, and removing a container is one unmount however many
files it made. Without the right to mount (not root, or a container runtime that forbids it), the work
dir is a plain directory and the quota is checked by a bounded walk during and after each call.

No tmpfs outlives the process that mounted it: a server that stops keeps a container's files for the next
one by moving them to disk (`persist`), where `data` is a plain directory, and back into a fresh tmpfs when
the container resumes (`restore`). Each move copies into `kept.tmp` and renames it (the commit point), so a
process killed half-way leaves a state the next start settles (`recover`): `kept.tmp` is garbage, `kept` is
the files.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from smolrun.sandbox import files as tree

KEPT = "kept"  # a complete copy of the work dir on disk, while the tmpfs is taken down or set up
COPYING = "kept.tmp"  # a copy under way
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
    _remove(directory)


def _remove(path: Path) -> None:
    """Remove a tree the sandbox may have shaped (see `files.remove_tree`); what cannot go is logged, and the
    container is gone all the same."""
    try:
        tree.remove_tree(path)
    except OSError as exc:
        logging.getLogger("smolrun").warning("%s could not be removed entirely: %s", path, exc)


def persist(directory: Path) -> bool:
    """Move the files of a container's quota tmpfs to disk and unmount it, leaving `data` a plain directory;
    False, with a warning, where they stay mounted (the disk is full, or the tree is past the tmpfs's own
    quota): nothing is lost either way."""
    workdir, copying, kept = directory / "data", directory / COPYING, directory / KEPT
    try:
        quota = os.statvfs(workdir)
        copying.mkdir(mode=0o700)
        tree.copy_tree(workdir, copying, quota.f_files - 1, quota.f_blocks * quota.f_frsize)
        _sync(copying)  # on disk before the commit: a clean stop survives a power cut
        os.rename(copying, kept)
        _sync(directory)
        _unpack(directory)
    except OSError as exc:
        _remove(copying)
        logging.getLogger("smolrun").warning("container %s keeps its files in memory, in the tmpfs at %s: "
                                             "moving them to disk failed: %s", directory.name, workdir, exc)
        return False
    return True


def restore(directory: Path, files: int, megabytes: int, uid: int | None) -> bool:
    """Move the files `persist` put on disk into a fresh quota tmpfs; False where they stay a plain directory
    (no right to mount, or the copy failed, with a warning)."""
    if os.geteuid() != 0:
        return False
    workdir, kept = directory / "data", directory / KEPT
    os.rename(workdir, kept)
    workdir.mkdir(mode=0o700)
    if not mount_quota(workdir, files, megabytes, uid):
        _unpack(directory)
        return False
    try:
        tree.copy_tree(kept, workdir, files, megabytes << 20)
    except OSError as exc:
        logging.getLogger("smolrun").warning("container %s runs over a plain directory: copying its files into "
                                             "its tmpfs failed: %s", directory.name, exc)
        _unpack(directory)
        return False
    os.rename(kept, directory / COPYING)  # the commit point: the tmpfs holds the files now
    _remove(directory / COPYING)
    return True


def recover(directory: Path) -> None:
    """Settle what a process stopped during `persist` or `restore` left: a copy under way is garbage, a
    complete one (`kept`) is the container's files, whatever `data` holds."""
    _remove(directory / COPYING)
    if os.path.isdir(directory / KEPT):
        _unpack(directory)


def _unpack(directory: Path) -> None:
    """Make `kept` the work dir: unmount `data` and remove what is left of it (empty, or a partial copy)."""
    workdir = directory / "data"
    if os.path.ismount(workdir) and _libc().umount2(os.fsencode(workdir), MNT_DETACH) != 0:
        raise OSError(ctypes.get_errno(), f"cannot unmount {workdir}")
    _remove(workdir)
    os.rename(directory / KEPT, workdir)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc().syncfs(fd) != 0:  # also where a write-back failed (ENOSPC, EIO)
            raise OSError(ctypes.get_errno(), f"cannot flush {path} to disk")
    finally:
        os.close(fd)
