"""Copying a hostile work dir on the host (a tmpfs to disk and back): links stay links, FIFOs are never opened,
no setuid bit survives, depth costs no descriptors, and the quota bounds the copy."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import socket
import stat
import threading
from pathlib import Path

import pytest

from smolrun.sandbox.files import chown_tree, copy_tree, listing, remove_tree
from tests.sandbox.conftest import needs_root

DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def _dirs(tmp_path: Path) -> tuple[Path, Path]:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    return source, target


def test_the_copy_is_the_same_tree_with_its_names_modes_and_times(tmp_path: Path) -> None:
    source, target = _dirs(tmp_path)
    (source / "sub" / "inner").mkdir(parents=True)
    (source / "sub" / "inner" / "data.csv").write_bytes(b"a,b\n1,2\n")
    (source / "empty").write_bytes(b"")
    (source / "caf\udce9").write_bytes(b"a name that is not UTF-8")  # the byte 0xe9 alone
    os.chmod(source / "sub", 0o750)
    for path, ns in ((source / "sub" / "inner" / "data.csv", 1_600_000_000_123_456_789),
                     (source / "empty", 1_500_000_000_000_000_001),
                     (source / "sub" / "inner", 1_400_000_000_000_000_005),
                     (source / "sub", 1_300_000_000_000_000_007)):
        os.utime(path, ns=(ns, ns))
    with socket.socket(socket.AF_UNIX) as server:  # a socket means nothing outside the sandbox: left out
        server.bind(str(source / "sock"))
        copy_tree(source, target, 50, 1 << 20)
    assert sorted(os.listdir(target)) == ["caf\udce9", "empty", "sub"]
    copied, original = listing(target, 50), listing(source, 50)
    assert copied.files == original.files  # every file, its size and its mtime in ns
    assert (copied.entries, original.entries) == (5, 6)
    assert listing(target, 50).files["caf\\xe9"] == (24, os.lstat(source / "caf\udce9").st_mtime_ns)
    for relative in ("sub", "sub/inner"):
        copied, original = os.lstat(target / relative), os.lstat(source / relative)
        assert (stat.S_IMODE(copied.st_mode), copied.st_mtime_ns) == (stat.S_IMODE(original.st_mode),
                                                                      original.st_mtime_ns)
    assert stat.S_IMODE(os.lstat(target / "sub").st_mode) == 0o750


def test_links_stay_links_and_what_they_point_to_is_never_copied(tmp_path: Path) -> None:
    source, target = _dirs(tmp_path)
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"the host's own bytes")
    links = {"shadow": "/etc/shadow", "secret": str(secret), "etc": "/etc", "sub/up": "../../host-secret",
             "sub/dangling": "/nowhere/at/all"}
    (source / "sub").mkdir()
    for name, points_to in links.items():
        os.symlink(points_to, source / name)
    copy_tree(source, target, 50, 1 << 20)
    assert {name: os.readlink(target / name) for name in links} == links
    assert all(stat.S_ISLNK(os.lstat(target / name).st_mode) for name in links)
    walked = listing(target, 50)
    assert (walked.files, walked.entries) == ({}, 6)  # no regular file was made: no target's bytes were read


def test_a_fifo_is_made_anew_and_never_opened(tmp_path: Path) -> None:
    source, target = _dirs(tmp_path)
    os.mkfifo(source / "queued", 0o640)  # bytes wait in it: a copy that opened and read it would take them
    os.mkfifo(source / "nobody")  # no writer: a blocking open would hang the host thread for ever
    reader = os.open(source / "queued", os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(source / "queued", os.O_WRONLY)
    try:
        os.write(writer, b"waiting")
        errors: list[BaseException] = []

        def copy() -> None:
            try:
                copy_tree(source, target, 50, 1 << 20)
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread below
                errors.append(exc)

        worker = threading.Thread(target=copy, daemon=True)
        worker.start()
        worker.join(30)
        assert not worker.is_alive() and errors == []
        assert os.read(reader, 100) == b"waiting"
    finally:
        os.close(reader)
        os.close(writer)
    modes = {name: os.lstat(target / name).st_mode for name in ("queued", "nobody")}
    assert all(stat.S_ISFIFO(mode) for mode in modes.values())
    assert stat.S_IMODE(modes["queued"]) == 0o640


def test_setuid_setgid_and_sticky_bits_are_dropped(tmp_path: Path) -> None:
    source, target = _dirs(tmp_path)
    (source / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(source / "tool", 0o6755)
    (source / "shared").mkdir()
    os.chmod(source / "shared", 0o3777)
    assert stat.S_IMODE(os.lstat(source / "tool").st_mode) == 0o6755  # the bits were there to drop
    copy_tree(source, target, 50, 1 << 20)
    assert stat.S_IMODE(os.lstat(target / "tool").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(target / "shared").st_mode) == 0o777


def _chain(top: Path, depth: int, link_to: Path | None = None) -> None:
    """`depth` directories of 255-byte names, one in the other (paths far past PATH_MAX), a file at the bottom
    and, with `link_to`, a link to it beside the file."""
    fd = os.open(top, DIR)
    try:
        for _ in range(depth):
            os.mkdir(b"d" * 255, dir_fd=fd)
            child = os.open(b"d" * 255, DIR, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open(b"bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"deep down")
        os.close(leaf)
        if link_to is not None:
            os.symlink(link_to, b"planted", dir_fd=fd)
    finally:
        os.close(fd)


def _bottom(top: Path, depth: int) -> tuple[list[str], os.stat_result, os.stat_result | None]:
    """The names at the bottom of a `_chain`, its file's status (its contents checked) and its link's."""
    fd = os.open(top, DIR)
    try:
        for _ in range(depth):
            assert os.listdir(fd) == ["d" * 255]
            child = os.open(b"d" * 255, DIR, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open(b"bottom", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            assert os.read(leaf, 100) == b"deep down"
            names = sorted(os.listdir(fd))
            link = os.stat(b"planted", dir_fd=fd, follow_symlinks=False) if "planted" in names else None
            return names, os.fstat(leaf), link
        finally:
            os.close(leaf)
    finally:
        os.close(fd)


def _few_descriptors() -> tuple[int, int]:
    """Lower the soft limit on open files to a few above those open now: a walk holding one per level fails."""
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, limits[1]))
    return limits


def test_a_tree_a_thousand_directories_deep_is_copied_with_a_few_descriptors(tmp_path: Path) -> None:
    source, target = _dirs(tmp_path)
    _chain(source, 1000)
    limits = _few_descriptors()
    try:
        copy_tree(source, target, 1001, 9)  # 1000 directories and a file of 9 bytes: exactly the quota
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    assert _bottom(target, 1000)[0] == ["bottom"]
    remove_tree(tmp_path)  # shutil.rmtree cannot: pytest's clean-up of old runs would fail on these trees


@needs_root
def test_a_tree_a_thousand_directories_deep_is_given_to_a_new_uid_with_a_few_descriptors(tmp_path: Path) -> None:
    host_file = tmp_path / "host-owned"
    host_file.write_text("root's")
    (tmp_path / "tree").mkdir()
    _chain(tmp_path / "tree", 1000, link_to=host_file)
    limits = _few_descriptors()
    try:
        chown_tree(tmp_path / "tree", 4242)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    names, leaf, link = _bottom(tmp_path / "tree", 1000)
    assert names == ["bottom", "planted"] and leaf.st_uid == 4242 and link is not None and link.st_uid == 4242
    assert host_file.stat().st_uid == 0  # the link was given away, never what it points to
    remove_tree(tmp_path)


def test_a_tree_a_thousand_directories_deep_is_removed_with_a_few_descriptors(tmp_path: Path) -> None:
    host_file = tmp_path / "host-owned"
    host_file.write_text("root's")
    (tmp_path / "tree").mkdir()
    _chain(tmp_path / "tree", 1000, link_to=host_file)
    os.symlink(tmp_path, tmp_path / "tree" / "up")  # a link to above the tree: removed, never followed
    with pytest.raises(RecursionError):
        shutil.rmtree(tmp_path / "tree")  # what the sandbox used before
    limits = _few_descriptors()
    try:
        remove_tree(tmp_path / "tree")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    assert sorted(os.listdir(tmp_path)) == ["host-owned"] and host_file.read_text() == "root's"
    remove_tree(tmp_path / "tree")  # gone already: nothing to do
    os.symlink(host_file, tmp_path / "link")
    remove_tree(tmp_path / "link")  # a link where a tree was expected: the link goes
    assert sorted(os.listdir(tmp_path)) == ["host-owned"]


def test_a_tree_past_its_quota_of_entries_or_bytes_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    for name in ("a", "b", "c", "sub/d", "sub/e"):
        (source / name).write_bytes(b"0123456789")  # 6 entries, 50 bytes
    for attempt, (entries, size) in enumerate(((5, 50), (6, 49))):
        target = tmp_path / f"refused-{attempt}"
        target.mkdir()
        with pytest.raises(OSError) as refused:
            copy_tree(source, target, entries, size)
        assert (refused.value.errno, refused.value.strerror) == (
            errno.EDQUOT, "the tree holds more entries or bytes than its quota")
    (tmp_path / "fits").mkdir()
    copy_tree(source, tmp_path / "fits", 6, 50)
    assert listing(tmp_path / "fits", 10) == listing(source, 10)


def test_a_sparse_file_larger_than_the_quota_is_refused_without_reading_it(tmp_path: Path) -> None:
    source, target = _dirs(tmp_path)
    with open(source / "huge", "wb") as huge:
        huge.truncate(1 << 40)  # a terabyte that takes no space where it is
    with pytest.raises(OSError) as refused:
        copy_tree(source, target, 10, 1 << 20)
    assert refused.value.errno == errno.EDQUOT
    assert os.listdir(target) == []
