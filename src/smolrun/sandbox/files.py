"""Host-side access to a container's work directory that code inside cannot turn against the host."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from smolrun.errors import InvalidRequest, NotFound


def safe_name(name: str) -> PurePosixPath:
    """A relative path inside the work dir: no absolute paths, `..`, NUL or empty parts."""
    path = PurePosixPath(name)
    if not name or "\x00" in name or path.is_absolute() or any(p in ("", ".", "..") for p in path.parts):
        raise InvalidRequest(f"invalid file path {name!r}: use a relative path without '..'", param="path")
    return path


def _open_parent(workdir: Path, name: str) -> tuple[int, str]:
    """A descriptor of the directory holding `name`, reached without following any symlink, and the leaf."""
    parts = safe_name(name).parts
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in parts[:-1]:
            next_fd = _open_at(fd, part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, name)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def read_file(workdir: Path, name: str, max_bytes: int) -> bytes:
    """Read a regular file without following any symlink and without blocking on FIFOs or devices."""
    fd, leaf_name = _open_parent(workdir, name)
    try:
        leaf = _open_at(fd, leaf_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, name)
    finally:
        os.close(fd)
    try:
        info = os.fstat(leaf)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidRequest(f"{name} is not a regular file", param="path")
        if info.st_size > max_bytes:
            raise InvalidRequest(f"{name} is larger than {max_bytes} bytes", param="path")
        chunks, total = [], 0
        while chunk := os.read(leaf, 1 << 20):
            total += len(chunk)
            if total > max_bytes:  # grew while being read
                raise InvalidRequest(f"{name} is larger than {max_bytes} bytes", param="path")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(leaf)


def _open_at(dir_fd: int, part: str, flags: int, name: str) -> int:
    try:
        return os.open(part, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise NotFound(f"no file {name} in the container") from None
    except OSError as exc:  # ELOOP (a symlink), ENOTDIR, EACCES ...
        raise InvalidRequest(f"{name} cannot be read: {exc.strerror}", param="path") from None


def snapshot(workdir: Path) -> dict[str, tuple[int, int]]:
    """Regular files under the work dir -> (size, mtime_ns), walking with lstat only (links are skipped)."""
    found: dict[str, tuple[int, int]] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            entries = list(os.scandir(workdir / rel if rel else workdir))
        except OSError:
            continue
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                stack.append(path)
            elif stat.S_ISREG(info.st_mode):
                found[path] = (info.st_size, info.st_mtime_ns)
    return found


def changed(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> tuple[str, ...]:
    return tuple(sorted(p for p, meta in after.items() if before.get(p) != meta))


def remove_file(workdir: Path, name: str) -> None:
    """Unlink a file (or a planted link itself) without following symlinks in its parent directories."""
    fd, leaf_name = _open_parent(workdir, name)
    try:
        try:
            os.unlink(leaf_name, dir_fd=fd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise InvalidRequest(f"{name} is a directory", param="path") from None
    finally:
        os.close(fd)
