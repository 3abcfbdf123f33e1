"""Host-side access to a container's work directory that code inside cannot turn against the host.

Code in the sandbox owns the tree, so every host access assumes it is hostile: paths are walked one
component at a time from a directory descriptor with O_NOFOLLOW (no symlink is followed and no path ever
reaches PATH_MAX), leaves are opened with O_NONBLOCK (a FIFO or a device never blocks a host thread) and
checked with fstat, names are carried as the kernel keeps them (bytes) and shown with undecodable bytes
escaped, and every walk is bounded in entries and depth.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from smolrun.errors import InvalidRequest, NotFound

NAME_MAX = 255  # bytes in one path component (Linux)
MAX_DEPTH = 64  # directories below /mnt/data that the host looks into
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LEAF = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def display(raw: bytes) -> str:
    """A path as the API shows it: UTF-8, with each undecodable byte as \\xNN and a backslash as \\\\.

    The escaping is reversible (see `parse`), so the shown path is also the one a client sends back.
    """
    text = raw.decode("utf-8", errors="surrogateescape").replace("\\", "\\\\")
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else c for c in text)


def parse(text: str) -> bytes:
    """The bytes of a path shown by `display`."""
    parts, last = [], 0
    for match in _ESCAPE.finditer(text):
        parts.append(text[last:match.start()].encode("utf-8", errors="surrogatepass"))
        escape = match.group(1)
        parts.append(b"\\" if escape == "\\" else bytes([int(escape[1:], 16)]))
        last = match.end()
    parts.append(text[last:].encode("utf-8", errors="surrogatepass"))
    return b"".join(parts)


def safe_parts(name: str) -> list[bytes]:
    """The components of a path relative to /mnt/data: no absolute paths, `..`, NUL or empty parts."""
    raw = parse(name)
    parts = raw.split(b"/")
    if not raw or b"\x00" in raw or raw.startswith(b"/") or any(p in (b"", b".", b"..") for p in parts):
        raise InvalidRequest(f"invalid file path {name!r}: use a relative path without '..'", param="path")
    if any(len(p) > NAME_MAX for p in parts):
        raise InvalidRequest(f"invalid file path {name!r}: a name is longer than {NAME_MAX} bytes", param="path")
    return parts


def upload_name(filename: str) -> bytes:
    """The name an uploaded file gets in /mnt/data: its base name, which must be a printable file name."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    if base in ("", ".", "..") or not base.isprintable():  # control characters, NUL, lone surrogates
        raise InvalidRequest(f"invalid file name {filename!r}: give the file a printable name", param="file")
    raw = base.encode("utf-8")
    if len(raw) > NAME_MAX:
        raise InvalidRequest(f"the file name is {len(raw)} bytes long; the limit is {NAME_MAX}", param="file")
    return raw


def _open_parent(workdir: Path, parts: list[bytes], name: str) -> int:
    """A descriptor of the directory holding the last of `parts`, reached without following any symlink."""
    fd = os.open(workdir, _DIR)
    try:
        for part in parts[:-1]:
            next_fd = _open_at(fd, part, _DIR, name)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_at(dir_fd: int, part: bytes, flags: int, name: str, mode: int = 0o644) -> int:
    try:
        return os.open(part, flags, mode, dir_fd=dir_fd)
    except FileNotFoundError:
        raise NotFound(f"no file {name} in the container") from None
    except OSError as exc:  # ELOOP (a symlink), ENOTDIR, EACCES ...
        raise InvalidRequest(f"{name} cannot be opened: {exc.strerror}", param="path") from None


def read_file(workdir: Path, name: str, max_bytes: int) -> bytes:
    """Read a regular file without following any symlink and without blocking on FIFOs or devices."""
    parts = safe_parts(name)
    fd = _open_parent(workdir, parts, name)
    try:
        leaf = _open_at(fd, parts[-1], os.O_RDONLY | _LEAF, name)
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


def write_file(workdir: Path, leaf: bytes, data: bytes, uid: int | None) -> str:
    """Write `data` as /mnt/data/<leaf> and return its shown path; nothing the sandbox planted can block it.

    The data goes to a new file first (O_EXCL, so never into a FIFO, a device or through a link), which
    then replaces a regular file of that name atomically; a directory, link or FIFO there is refused.
    """
    shown = display(leaf)
    fd = os.open(workdir, _DIR)
    temporary = f".smolrun-upload-{uuid.uuid4().hex}".encode()
    try:
        try:
            out = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _LEAF, 0o644, dir_fd=fd)
        except OSError as exc:
            raise _storage_error(exc, shown) from None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(out, view):]
            if uid is not None:
                os.fchown(out, uid, uid)
        except OSError as exc:
            os.unlink(temporary, dir_fd=fd)
            raise _storage_error(exc, shown) from None
        finally:
            os.close(out)
        try:
            existing = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and not stat.S_ISREG(existing.st_mode):
            os.unlink(temporary, dir_fd=fd)
            raise InvalidRequest(f"/mnt/data/{shown} already exists and is a {_kind(existing.st_mode)}, not a "
                                 "regular file: delete it first", param="file")
        try:
            os.rename(temporary, leaf, src_dir_fd=fd, dst_dir_fd=fd)
        except OSError as exc:  # the sandbox put a directory there in the meantime
            os.unlink(temporary, dir_fd=fd)
            raise InvalidRequest(f"/mnt/data/{shown} cannot be replaced: {exc.strerror}", param="file") from None
    finally:
        os.close(fd)
    return f"/mnt/data/{shown}"


def _storage_error(exc: OSError, shown: str) -> InvalidRequest:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return InvalidRequest(f"/mnt/data/{shown} does not fit: the container's storage is full (its quota of "
                              "files and bytes is used up); delete files first", param="file", code="container_full")
    return InvalidRequest(f"/mnt/data/{shown} cannot be written: {exc.strerror}", param="file")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    return "special file"


def remove_file(workdir: Path, name: str) -> None:
    """Unlink a file (or a planted link itself) without following symlinks in its parent directories."""
    parts = safe_parts(name)
    fd = _open_parent(workdir, parts, name)
    try:
        try:
            os.unlink(parts[-1], dir_fd=fd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise InvalidRequest(f"{name} is a directory", param="path") from None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Listing:
    """What a bounded walk of the work dir saw."""

    files: dict[str, tuple[int, int]]  # shown path of each regular file -> (size, mtime_ns)
    entries: int  # every entry counted (files, directories, links, FIFOs): what the quota counts
    complete: bool  # False when the walk stopped at `max_entries` or skipped directories past MAX_DEPTH

    @property
    def size(self) -> int:
        return sum(size for size, _ in self.files.values())


def listing(workdir: Path, max_entries: int) -> Listing:
    """Regular files under the work dir, walked with directory descriptors and lstat only (links skipped).

    The walk stops after `max_entries` entries, so its cost is bounded whatever the code created.
    """
    found: dict[str, tuple[int, int]] = {}
    counted = 0
    complete = True

    def walk(dir_fd: int, prefix: bytes, depth: int) -> None:
        nonlocal counted, complete
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                if counted >= max_entries:
                    complete = False
                    return
                counted += 1
                raw = os.fsencode(entry.name)
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # gone since the directory was read
                path = prefix + raw
                if stat.S_ISREG(info.st_mode):
                    found[display(path)] = (info.st_size, info.st_mtime_ns)
                elif stat.S_ISDIR(info.st_mode):
                    if depth >= MAX_DEPTH:
                        complete = False
                        continue
                    try:
                        child = os.open(raw, _DIR, dir_fd=dir_fd)
                    except OSError:
                        continue  # replaced by a link or removed meanwhile
                    try:
                        walk(child, path + b"/", depth + 1)
                    finally:
                        os.close(child)

    try:
        root = os.open(workdir, _DIR)
    except OSError:
        return Listing({}, 0, True)
    try:
        walk(root, b"", 0)
    finally:
        os.close(root)
    return Listing(found, counted, complete)


def changed(before: Listing, after: Listing) -> tuple[str, ...]:
    return tuple(sorted(p for p, meta in after.files.items() if before.files.get(p) != meta))


def chown_tree(workdir: Path, uid: int) -> None:
    """Give every entry under `workdir` to `uid`: links themselves, never what they point to (the walk holds
    one directory descriptor and follows no link, so planted links and deep trees lead nowhere else)."""
    fd = os.open(workdir, _DIR)
    try:
        stack = [(_identity(os.fstat(fd)), os.listdir(fd))]
        while stack:
            _, names = stack[-1]
            if not names:
                stack.pop()
                if stack:
                    fd = _up(fd, stack[-1][0])
                continue
            name = os.fsencode(names.pop())
            try:
                os.chown(name, uid, uid, dir_fd=fd, follow_symlinks=False)
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode):
                child = os.open(name, _DIR, dir_fd=fd)
                os.close(fd)
                fd = child
                stack.append((_identity(info), os.listdir(fd)))
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove `path` and everything under it; nothing where it is gone already.

    Unlike `shutil.rmtree`, which recurses once per level (a tree a thousand directories deep raises
    RecursionError), the walk holds one directory descriptor and a list of names per level, and follows no
    link, so no tree the sandbox made can stop its own removal. OSError where an entry cannot be removed.
    """
    try:
        fd = os.open(path, _DIR)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        os.unlink(path)  # a file or a link where a directory was expected: the link itself goes
        return
    try:
        stack = [(_identity(os.fstat(fd)), b"", os.listdir(fd))]
        while stack:
            names = stack[-1][2]
            if not names:
                _, name, _ = stack.pop()
                if stack:
                    fd = _up(fd, stack[-1][0])
                    os.rmdir(name, dir_fd=fd)
                continue
            name = os.fsencode(names.pop())
            try:
                os.unlink(name, dir_fd=fd)
                continue
            except FileNotFoundError:
                continue
            except IsADirectoryError:
                pass
            child = os.open(name, _DIR, dir_fd=fd)
            os.close(fd)
            fd = child
            stack.append((_identity(os.fstat(fd)), name, os.listdir(fd)))
    finally:
        os.close(fd)
    os.rmdir(path)


_PERMISSIONS = 0o777  # what a copy keeps of a mode: never a setuid, setgid or sticky bit


@dataclass
class _Budget:
    """What a copy may still create: the quota its source had to fit in."""

    entries: int
    bytes: int

    def take(self, entries: int = 0, size: int = 0) -> None:
        self.entries -= entries
        self.bytes -= size
        if self.entries < 0 or self.bytes < 0:
            raise OSError(errno.EDQUOT, "the tree holds more entries or bytes than its quota")


@dataclass
class _Level:
    """A directory being copied: the names left to copy, and what its copy gets once they are done."""

    names: list[bytes]
    source: tuple[int, int]  # (st_dev, st_ino), where `..` of a child must lead back to
    copy: tuple[int, int]
    mode: int
    times: tuple[int, int]  # atime and mtime, ns


def copy_tree(source: Path, target: Path, max_entries: int, max_bytes: int) -> None:
    """Copy the tree under `source` into the empty directory `target`, assuming `source` is hostile.

    Walked like every host access here (one descriptor per tree, however deep; no link followed), it copies
    regular files, directories, links (as links) and FIFOs (made anew, never opened), with their permission
    bits (less setuid, setgid and sticky) and times; sockets and devices are left out. OSError, with `target`
    partly filled, when a write fails or the tree holds more than `max_entries` entries or `max_bytes` bytes.
    """
    budget = _Budget(max_entries, max_bytes)
    source_fd = os.open(source, _DIR)
    try:
        target_fd = os.open(target, _DIR)
    except BaseException:
        os.close(source_fd)
        raise
    try:
        stack = [_level(source_fd, target_fd, budget)]
        while stack:
            level = stack[-1]
            if level.names:
                opened = _copy_entry(source_fd, target_fd, level.names.pop(), budget)
                if opened is not None:  # a directory: copy its contents before the rest of this one
                    os.close(source_fd)
                    os.close(target_fd)
                    source_fd, target_fd = opened
                    stack.append(_level(source_fd, target_fd, budget))
                continue
            os.fchmod(target_fd, level.mode)
            os.utime(target_fd, ns=level.times)  # last: creating its entries changed its mtime
            stack.pop()
            if stack:
                source_fd = _up(source_fd, stack[-1].source)
                target_fd = _up(target_fd, stack[-1].copy)
    finally:
        os.close(source_fd)
        os.close(target_fd)


def _level(source_fd: int, target_fd: int, budget: _Budget) -> _Level:
    info = os.fstat(source_fd)
    names = []
    with os.scandir(source_fd) as entries:
        for entry in entries:
            budget.take(entries=1)  # before reading on: a directory of millions of names stops here
            names.append(os.fsencode(entry.name))
    return _Level(names, _identity(info), _identity(os.fstat(target_fd)), info.st_mode & _PERMISSIONS,
                  (info.st_atime_ns, info.st_mtime_ns))


def _copy_entry(source_fd: int, target_fd: int, name: bytes, budget: _Budget) -> tuple[int, int] | None:
    """Copy one entry; for a directory, made empty, the descriptors of it and its copy."""
    try:
        info = os.stat(name, dir_fd=source_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None  # removed since its directory was read
    mode = info.st_mode & _PERMISSIONS
    if stat.S_ISDIR(info.st_mode):
        child = os.open(name, _DIR, dir_fd=source_fd)
        try:
            os.mkdir(name, 0o700, dir_fd=target_fd)
            return child, os.open(name, _DIR, dir_fd=target_fd)
        except BaseException:
            os.close(child)
            raise
    if stat.S_ISREG(info.st_mode):
        _copy_file(source_fd, target_fd, name, budget)
        return None
    if stat.S_ISLNK(info.st_mode):
        os.symlink(os.readlink(name, dir_fd=source_fd), name, dir_fd=target_fd)
    elif stat.S_ISFIFO(info.st_mode):
        os.mkfifo(name, mode, dir_fd=target_fd)
        os.chmod(name, mode, dir_fd=target_fd)  # mkfifo's mode went through the umask
    else:
        return None  # a socket or a device means nothing outside the sandbox that made it
    os.utime(name, ns=(info.st_atime_ns, info.st_mtime_ns), dir_fd=target_fd, follow_symlinks=False)
    return None


def _copy_file(source_fd: int, target_fd: int, name: bytes, budget: _Budget) -> None:
    leaf = os.open(name, os.O_RDONLY | _LEAF, dir_fd=source_fd)
    try:
        info = os.fstat(leaf)
        if not stat.S_ISREG(info.st_mode):
            return  # replaced since the lstat by a FIFO or a device, which O_NONBLOCK opened without waiting
        budget.take(size=info.st_size)  # before copying: a sparse file of terabytes is refused, not read
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _LEAF, 0o600, dir_fd=target_fd)
        try:
            left = info.st_size
            while left > 0 and (chunk := os.read(leaf, min(left, 1 << 20))):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
                left -= len(chunk)
            os.fchmod(out, info.st_mode & _PERMISSIONS)
            os.utime(out, ns=(info.st_atime_ns, info.st_mtime_ns))
        finally:
            os.close(out)
    finally:
        os.close(leaf)


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _up(fd: int, expected: tuple[int, int]) -> int:
    """The parent of directory `fd`, which is closed, checked to be the directory the walk came down from."""
    parent = os.open(b"..", _DIR, dir_fd=fd)
    if _identity(os.fstat(parent)) != expected:  # moved meanwhile: `..` leads elsewhere
        os.close(parent)
        raise OSError(errno.ESTALE, "a directory moved during the walk")
    os.close(fd)
    return parent
