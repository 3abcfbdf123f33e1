"""A container: one sandboxed, stateful Python worker with a work directory, run one cell at a time."""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import select
import signal
import struct
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from smolrun.errors import SandboxUnavailable
from smolrun.sandbox import files, storage
from smolrun.sandbox.launch import MiB, SandboxConfig, start, unavailable_reason

PRELOAD = ("numpy", "pandas", "matplotlib", "matplotlib.pyplot")
_FIRST_UID = 100_000
_UID_COUNT = 10_000
MAX_FRAME = 32 * MiB  # the largest reply the host reads: clipped texts and at most 16 MiB of images
MAX_IMAGES = 32
QUOTA_POLL_S = 0.1


@dataclass(frozen=True)
class ExecError:
    name: str
    value: str
    traceback: str


@dataclass(frozen=True)
class Execution:
    """What one call produced; errors in the user's code are results, not exceptions."""

    logs: str
    result: str | None
    error: ExecError | None
    images: tuple[bytes, ...]  # PNG
    files: tuple[str, ...]  # files in /mnt/data created or changed by the call
    duration_s: float
    timed_out: bool = False
    state_lost: bool = False  # the worker was restarted: variables and imports are gone


class _Uids:
    """One host uid per live container, so RLIMIT_NPROC and file ownership are never shared, across every
    smolrun process on the host too: a uid is taken by an exclusive lock on its file in `directory`, which the
    kernel releases when the holder closes it or dies."""

    def __init__(self, directory: Path = Path("/run/smolrun/uids"), first: int = _FIRST_UID,
                 count: int = _UID_COUNT) -> None:
        self.directory, self.first, self.count = directory, first, count
        self._held: dict[int, int] = {}  # uid -> the descriptor holding its lock
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            for uid in range(self.first, self.first + self.count):
                if uid in self._held:
                    continue
                fd = os.open(self.directory / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another smolrun process has it
                    os.close(fd)
                    continue
                self._held[uid] = fd
                return uid
        raise SandboxUnavailable(f"all {self.count} sandbox uids from {self.first} are in use on this host")

    def give_back(self, uid: int) -> None:
        with self._lock:
            fd = self._held.pop(uid, None)
        if fd is not None:
            os.close(fd)


_uids = _Uids()


@dataclass(frozen=True)
class _Reply:
    """One reply of the supervisor, checked: the only shape the host accepts from inside the sandbox."""

    logs: str
    result: str | None
    error: ExecError | None
    images: tuple[bytes, ...]


class _ChannelBroken(Exception):
    """The sandbox sent something outside the protocol; the container is killed and restarted."""


def _parse_reply(body: bytes, seq: int, limit: int) -> _Reply:
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _ChannelBroken("the sandbox sent a reply that is not JSON") from None
    if not isinstance(raw, dict):
        raise _ChannelBroken("the sandbox sent a reply that is not an object")
    if "fatal" in raw:
        raise _ChannelBroken(_text(raw.get("fatal"), 1000) or "the sandbox stopped")
    if raw.get("seq") != seq:
        raise _ChannelBroken(f"the sandbox answered request {raw.get('seq')!r} instead of {seq}")
    error = raw.get("error")
    if error is not None and not isinstance(error, dict):
        raise _ChannelBroken("the sandbox sent a malformed error")
    images = raw.get("images")
    if not isinstance(images, list) or len(images) > MAX_IMAGES or not all(isinstance(i, str) for i in images):
        raise _ChannelBroken("the sandbox sent malformed images")
    try:
        pngs = tuple(base64.b64decode(i, validate=True) for i in images)
    except ValueError:
        raise _ChannelBroken("the sandbox sent an image that is not base64") from None
    # The supervisor clips every text to `limit` bytes (logs: twice, output and displayed text); the host
    # clips again rather than trust it.
    return _Reply(
        logs=_text(raw.get("logs"), 2 * limit + 200) or "",
        result=_text(raw.get("result"), limit + 100),
        error=None if error is None else ExecError(_text(error.get("name"), 200) or "Error",
                                                   _text(error.get("value"), limit + 100) or "",
                                                   _text(error.get("traceback"), limit + 100) or ""),
        images=pngs,
    )


def _text(value: object, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None


@dataclass
class Container:
    config: SandboxConfig
    id: str = field(default_factory=lambda: f"cntr_{uuid.uuid4().hex}")
    preload: tuple[str, ...] = PRELOAD
    created_at: float = field(default_factory=time.time)
    last_active_at: float = field(default_factory=time.time)
    _proc: subprocess.Popen[bytes] | None = None
    _uid: int | None = None
    _cgroups: list[Path] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _seq: int = 0
    _tmpfs: bool = False  # the work dir is a quota tmpfs (see storage.py)
    _owner: int | None = None  # the descriptor holding the directory's owner lock
    _resumed: bool = False  # started over a kept work directory: the next call reports state_lost

    @property
    def workdir(self) -> Path:
        return self.config.root / self.id / "data"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, resume: bool = False) -> Container:
        """Start the worker; with `resume`, over the work directory an earlier process kept (see close), whose
        files stay and whose first call reports `state_lost`."""
        reason = unavailable_reason_cached(self.config)
        if reason is not None:
            raise SandboxUnavailable(f"code execution is unavailable: {reason}")
        directory = self.workdir.parent
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o755)
        self._owner = _hold(directory / OWNER_LOCK)  # held while the container lives (sweep_orphans)
        if resume:
            storage.recover(directory)  # a process stopped while it moved these files
        if os.geteuid() == 0:
            self._uid = _uids.take()
        limits = self.config.limits
        if resume and os.path.ismount(self.workdir):  # its quota tmpfs outlived the process that mounted it
            self._tmpfs = True
        elif resume:  # on disk since the process before stopped (see close)
            self._tmpfs = self.config.quota_tmpfs and storage.restore(directory, limits.work_files,
                                                                      limits.work_mb, self._uid)
        else:
            self._tmpfs = self.config.quota_tmpfs and storage.mount_quota(self.workdir, limits.work_files,
                                                                          limits.work_mb, self._uid)
        if self._uid is not None:
            if resume:  # the files belong to the uid of the process before
                files.chown_tree(self.workdir, self._uid)
            os.chown(self.workdir, self._uid, self._uid)
            os.chmod(self.workdir, 0o700)
        self._launch()
        self._resumed = resume
        return self

    def _launch(self) -> None:
        self._cgroups = _make_cgroups(self.id, self.config) if os.geteuid() == 0 else []
        self._proc = start(self.config, self.workdir, self._uid, [g / "cgroup.procs" for g in self._cgroups])
        try:
            ready = self._receive_frame(time.monotonic() + 30)
            if ready is None or json.loads(ready) != {"ready": True}:
                raise _ChannelBroken("no hello")
            if self.preload:
                self._call({"preload": list(self.preload)}, time.monotonic() + 60)
        except (_ChannelBroken, ValueError):
            self._kill()
            raise SandboxUnavailable("the sandboxed Python worker failed to start") from None

    def run(self, code: str, timeout: float | None = None) -> Execution:
        """Run one cell. A timeout interrupts it, then restarts the worker if it does not stop."""
        with self._lock:
            self.last_active_at = time.time()
            notice = self._revive()
            if self._resumed:
                self._resumed = False
                notice = ("smolrun was restarted since this container's last call: its files are kept, its "
                          "variables and imports are gone")
            limits = self.config.limits
            deadline_s = limits.timeout_s if timeout is None else timeout
            before = files.listing(self.workdir, limits.work_files + 1)
            started = time.monotonic()
            timed_out = over_quota = False
            why_lost: str | None = None
            reply: _Reply | None = None
            try:
                seq = self._send({"code": code, "output_limit": limits.output_bytes})
                over_quota = self._wait_for_reply(started + deadline_s)
                if not over_quota and self._readable(0):
                    reply = self._reply(seq, started + deadline_s + 5)
                elif self.running:
                    timed_out = not over_quota
                    self._interrupt()
                    if self._readable(limits.grace_s):
                        reply = self._reply(seq, time.monotonic() + limits.grace_s + 5)
                if reply is None:
                    why_lost = (f"the call exceeded its {deadline_s:g} s timeout and did not stop when interrupted"
                                if timed_out else "the Python process died (out of memory, or it exited)")
            except _ChannelBroken as broken:
                why_lost = str(broken)
            if why_lost is not None:
                self._kill()
                self._launch()
            duration = time.monotonic() - started
            after = files.listing(self.workdir, limits.work_files + 1)
            self.last_active_at = time.time()
            execution = self._execution(reply, why_lost, after, files.changed(before, after), duration, timed_out)
            if notice is None:
                return execution
            return replace(execution, logs=f"[{notice}]\n{execution.logs}", state_lost=True)

    def _revive(self) -> str | None:
        """Restart a worker that stopped between calls; why it had stopped, or None if it was running."""
        if self.running and not self._readable(0):
            return None
        why = "the container's Python process had stopped"
        if self._proc is not None and self._readable(0):  # its last words: a fatal message, at most
            try:
                frame = self._receive_frame(time.monotonic() + 1)
                if frame is not None:
                    _parse_reply(frame, self._seq, 0)
            except _ChannelBroken as broken:
                why = str(broken)
        self._kill()
        self._launch()
        return f"{why}; it was restarted, and its variables and imports are gone"

    def _wait_for_reply(self, deadline: float) -> bool:
        """Wait until the worker answers or the deadline passes; True when the cell was stopped over quota.

        On a quota tmpfs the kernel enforces the quota; on a plain directory it is checked every tenth of
        a second with a walk bounded by the quota itself.
        """
        while (left := deadline - time.monotonic()) > 0:
            if self._readable(min(left, QUOTA_POLL_S) if not self._tmpfs else left):
                return False
            if not self._tmpfs and files.listing(self.workdir, self.config.limits.work_files + 1).entries > \
                    self.config.limits.work_files:
                return True
        return False

    def _execution(self, reply: _Reply | None, why_lost: str | None, after: files.Listing,
                   changed: tuple[str, ...], duration: float, timed_out: bool) -> Execution:
        limits = self.config.limits
        if reply is None:
            reply = _Reply("", None, ExecError("SandboxRestarted", f"{why_lost or 'the sandbox stopped'}; the "
                                               "container was restarted and its state was lost", ""), ())
        error = reply.error
        if timed_out and error is not None and error.name == "KeyboardInterrupt":
            error = ExecError("TimeoutError", "the call exceeded its timeout and was interrupted; variables are "
                              "kept", error.traceback)
        full = storage.is_full(self.workdir) if self._tmpfs else (
            after.entries > limits.work_files or after.size > limits.work_mb * MiB)
        if full:
            error = ExecError("QuotaExceeded", f"/mnt/data is full: its quota is {limits.work_files} files and "
                              f"directories and {limits.work_mb} MiB; delete files", "")
        return Execution(reply.logs, reply.result, error, reply.images, changed, duration, timed_out,
                         why_lost is not None)

    def _send(self, message: dict[str, Any]) -> int:
        """Send a request; its sequence number, which the reply must carry."""
        assert self._proc is not None and self._proc.stdin is not None
        self._seq += 1
        data = json.dumps({**message, "seq": self._seq}).encode()
        try:
            self._proc.stdin.write(struct.pack(">I", len(data)) + data)
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # the worker died; reading the reply reports it
        return self._seq

    def _call(self, message: dict[str, Any], deadline: float) -> _Reply | None:
        seq = self._send(message)
        return self._reply(seq, deadline) if self._readable(deadline - time.monotonic()) else None

    def _reply(self, seq: int, deadline: float) -> _Reply | None:
        frame = self._receive_frame(deadline)
        return None if frame is None else _parse_reply(frame, seq, self.config.limits.output_bytes)

    def _readable(self, timeout: float) -> bool:
        if self._proc is None or self._proc.stdout is None:
            return False
        return bool(select.select([self._proc.stdout.fileno()], [], [], max(timeout, 0))[0])

    def _receive_frame(self, deadline: float) -> bytes | None:
        """One frame, or None on timeout or when the sandbox is gone; _ChannelBroken past MAX_FRAME."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        header = self._read_exact(fd, 4, deadline)
        if header is None:
            return None
        (size,) = struct.unpack(">I", header)
        if size > MAX_FRAME:
            raise _ChannelBroken(f"the sandbox announced a reply of {size} bytes (the limit is {MAX_FRAME})")
        return self._read_exact(fd, size, deadline)

    @staticmethod
    def _read_exact(fd: int, size: int, deadline: float) -> bytes | None:
        chunks, got = [], 0
        while got < size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, min(size - got, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _interrupt(self) -> None:
        """SIGINT the supervisor, which passes it to the worker: IPython raises KeyboardInterrupt, keeping state."""
        if self._proc is None:
            return
        for pid in _descendants(self._proc.pid)[:1]:  # [the supervisor (pid 1 inside), the worker, ...]
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def _kill(self) -> None:
        if self._proc is None:
            return
        inside = _descendants(self._proc.pid)
        for pid in [self._proc.pid, *inside]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._proc.wait()
        # The pid namespace dies with its init, asynchronously: wait so nothing of it outlives close().
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in inside) and time.monotonic() < deadline:
            time.sleep(0.01)
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()
        self._proc = None
        for group in self._cgroups:
            remove_cgroup(group)
        self._cgroups = []

    def put_file(self, name: str, data: bytes) -> str:
        """Write an uploaded file into /mnt/data (owned by the container's uid); returns its path inside."""
        return files.write_file(self.workdir, files.upload_name(name), data, self._uid)

    def read_file(self, name: str, max_bytes: int = 512 * MiB) -> bytes:
        return files.read_file(self.workdir, name, max_bytes)

    def close(self, keep_files: bool = False) -> None:
        """Stop the worker and delete the work directory (one unmount on a quota tmpfs), or with `keep_files`
        leave it for a later process to resume (a server shutting down), on disk: no tmpfs outlives us."""
        with self._lock:
            self._kill()
            if not keep_files:
                storage.release(self.workdir.parent, self.workdir)
            elif self._tmpfs:
                storage.persist(self.workdir.parent)
            if self._uid is not None:
                _uids.give_back(self._uid)
                self._uid = None
            if self._owner is not None:
                os.close(self._owner)
                self._owner = None


OWNER_LOCK = "owner.lock"
OWNER_STORE = "store"  # the path of the database that registered the container, for sweep_orphans
ORPHAN_AGE_S = 60.0  # a directory without its lock yet is being created, unless it is older than this


def _hold(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def sweep_orphans(root: Path, keep: frozenset[str] = frozenset(), store: Path | None = None) -> int:
    """Settle what smolrun processes that died (killed, or stopped during a warm-pool refill) left under
    `root`, in container directories whose owner lock nobody holds; the number removed.

    Removed, with their tmpfs and cgroups: those nobody may resume. Kept, their files moved from their tmpfs
    to disk as a server that stops does: those in `keep` (the caller's containers kept across its restart)
    and those another server's store (named in their OWNER_STORE file) still exists to resume. Left alone:
    directories of live containers (their locks are held, in this process or another)."""
    removed = 0
    for directory in sorted(root.iterdir()) if root.is_dir() else ():
        if not directory.name.startswith("cntr_") or not directory.is_dir():
            continue
        resumable = directory.name in keep or not _orphan_of(directory, store)
        try:
            fd = os.open(directory / OWNER_LOCK, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if resumable or time.time() - directory.stat().st_mtime < ORPHAN_AGE_S:
                continue
            fd = None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
            if resumable:
                _keep_directory(directory)
            else:
                release_directory(directory)
                removed += 1
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def release_directory(directory: Path) -> None:
    """Remove a container's directory that no Container object holds: its tmpfs, files and cgroups."""
    storage.release(directory, directory / "data")
    _remove_cgroups(directory.name)


def _keep_directory(directory: Path) -> None:
    """Leave a dead process's container to be resumed with its files on disk, without its tmpfs or cgroups."""
    try:
        storage.recover(directory)
    except OSError as exc:
        logging.getLogger("smolrun").warning("container %s was left half-moved: %s", directory.name, exc)
    if os.path.ismount(directory / "data"):
        storage.persist(directory)
    _remove_cgroups(directory.name)


def _remove_cgroups(container_id: str) -> None:
    for controller in ("memory", "pids", "cpu"):
        remove_cgroup(CGROUPS / controller / "smolrun" / container_id)


def _orphan_of(directory: Path, store: Path | None) -> bool:
    """Whether nobody may resume `directory`: it was never registered, or by this store, or by a store gone."""
    try:
        owner = Path((directory / OWNER_STORE).read_text())
    except (FileNotFoundError, UnicodeDecodeError):
        return True
    return owner == store or not owner.exists()


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for a reaper outside our control."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop(0)
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            out.append(child)
            stack.append(child)
    return out


CGROUPS = Path("/sys/fs/cgroup")


def _make_cgroups(container_id: str, config: SandboxConfig) -> list[Path]:
    """Memory, pids and cpu cgroups (v1 layout, as on this machine kind); absent or read-only ones are skipped.

    The cpu weight is set on the parent group, `smolrun`, which holds every container: all sandboxed code
    together weighs as one task at the sandbox's nice beside the model's threads (CFS weighs nice 0 as 1024,
    and each step of nice 1.25 times less), and containers share that equally. A weight on each container's
    own group would only rank containers among themselves. Unlike the nice, code inside cannot undo it: a task
    in a cgroup is not regrouped by session (autogroups), and the cgroup is not visible inside.
    """
    made: list[Path] = []
    limits = config.limits
    for controller, shared, own in (("memory", {}, {"memory.limit_in_bytes": limits.memory_mb * MiB}),
                                    ("pids", {}, {"pids.max": limits.pids}),
                                    ("cpu", {"cpu.shares": round(1024 / 1.25 ** limits.nice)}, {})):
        if not os.path.ismount(os.path.realpath(CGROUPS / controller)):
            continue  # no v1 hierarchy of it (cgroup v2's one tree): making the directory would make a v2 group
        group = CGROUPS / controller / "smolrun" / container_id
        try:
            group.mkdir(parents=True, exist_ok=True)
            for name, value in shared.items():
                (group.parent / name).write_text(str(value))
            for name, value in own.items():
                (group / name).write_text(str(value))
        except OSError:
            remove_cgroup(group)
            continue
        made.append(group)
    return made


def remove_cgroup(group: Path) -> None:
    for _ in range(50):  # the killed processes leave the group asynchronously
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


_availability: dict[SandboxConfig, str | None] = {}


def unavailable_reason_cached(config: SandboxConfig) -> str | None:
    if config not in _availability:
        _availability[config] = unavailable_reason(config)
    return _availability[config]
