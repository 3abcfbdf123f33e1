"""A container: one sandboxed, stateful Python worker with a work directory, run one cell at a time."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolrun.errors import SandboxUnavailable
from smolrun.sandbox import files
from smolrun.sandbox.launch import MiB, SandboxConfig, start, unavailable_reason

PRELOAD = ("numpy", "pandas", "matplotlib", "matplotlib.pyplot")
_FIRST_UID = 100_000


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
    """One host uid per live container, so RLIMIT_NPROC and file ownership are never shared."""

    def __init__(self) -> None:
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            uid = _FIRST_UID
            while uid in self._used:
                uid += 1
            self._used.add(uid)
            return uid

    def give_back(self, uid: int) -> None:
        with self._lock:
            self._used.discard(uid)


_uids = _Uids()


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

    @property
    def workdir(self) -> Path:
        return self.config.root / self.id / "data"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Container:
        reason = unavailable_reason_cached(self.config)
        if reason is not None:
            raise SandboxUnavailable(f"code execution is unavailable: {reason}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir.parent, 0o755)
        if os.geteuid() == 0:
            self._uid = _uids.take()
            os.chown(self.workdir, self._uid, self._uid)
            os.chmod(self.workdir, 0o700)
        self._launch()
        return self

    def _launch(self) -> None:
        self._cgroups = _make_cgroups(self.id, self.config) if os.geteuid() == 0 else []
        self._proc = start(self.config, self.workdir, self._uid, [g / "cgroup.procs" for g in self._cgroups])
        ready = self._receive(time.monotonic() + 30)
        if not ready or not ready.get("ready"):
            self._kill()
            raise SandboxUnavailable("the sandboxed Python worker failed to start")
        if self.preload:
            self._send({"preload": list(self.preload)})
            self._receive(time.monotonic() + 60)

    def run(self, code: str, timeout: float | None = None) -> Execution:
        """Run one cell. A timeout interrupts it, then restarts the worker if it does not stop."""
        with self._lock:
            self.last_active_at = time.time()
            if not self.running:
                self._launch()
            limits = self.config.limits
            deadline_s = limits.timeout_s if timeout is None else timeout
            before = files.snapshot(self.workdir)
            started = time.monotonic()
            self._send({"code": code, "output_limit": limits.output_bytes})
            reply = self._receive(started + deadline_s)
            timed_out = state_lost = False
            if reply is None and self.running:
                timed_out = True
                self._interrupt()
                reply = self._receive(time.monotonic() + limits.grace_s)
            if reply is None:
                state_lost = True
                self._kill()
                self._launch()
            duration = time.monotonic() - started
            after = files.snapshot(self.workdir)
            self.last_active_at = time.time()
            return self._execution(reply, after, files.changed(before, after), duration, timed_out, state_lost)

    def _execution(self, reply: dict[str, Any] | None, after: dict[str, tuple[int, int]], changed: tuple[str, ...],
                   duration: float, timed_out: bool, state_lost: bool) -> Execution:
        limits = self.config.limits
        error: ExecError | None = None
        if reply is None:
            why = (f"the call exceeded its {limits.timeout_s:g} s timeout and did not stop when interrupted"
                   if timed_out else "the Python process died (out of memory, or it exited)")
            error = ExecError("SandboxRestarted", f"{why}; the container was restarted and its state was lost", "")
            reply = {"logs": "", "result": None}
        elif reply.get("error"):
            e = reply["error"]
            error = ExecError(e["name"], e["value"], e["traceback"])
        if timed_out and error is not None and error.name == "KeyboardInterrupt":
            error = ExecError("TimeoutError", f"the call exceeded its {limits.timeout_s:g} s timeout and was "
                              "interrupted; variables are kept", error.traceback)
        n_bytes = sum(size for size, _ in after.values())
        if len(after) > limits.work_files or n_bytes > limits.work_mb * MiB:
            error = ExecError("QuotaExceeded", f"/mnt/data holds {len(after)} files and {n_bytes} bytes, over the "
                              f"quota of {limits.work_files} files and {limits.work_mb} MiB; delete files", "")
        images = tuple(base64.b64decode(i) for i in reply.get("images", []))
        return Execution(reply.get("logs", ""), reply.get("result"), error, images, changed, duration, timed_out,
                         state_lost)

    def _send(self, message: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        data = json.dumps(message).encode()
        try:
            self._proc.stdin.write(struct.pack(">I", len(data)) + data)
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # the worker died; _receive reports it

    def _receive(self, deadline: float) -> dict[str, Any] | None:
        """One reply, or None on timeout or when the worker is gone."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        header = self._read_exact(fd, 4, deadline)
        if header is None:
            return None
        (size,) = struct.unpack(">I", header)
        body = self._read_exact(fd, size, deadline + 5)
        return json.loads(body) if body is not None else None

    @staticmethod
    def _read_exact(fd: int, size: int, deadline: float) -> bytes | None:
        chunks, got = [], 0
        while got < size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, size - got)
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _interrupt(self) -> None:
        """SIGINT the worker: IPython turns it into KeyboardInterrupt and keeps the namespace."""
        if self._proc is None:
            return
        for pid in _descendants(self._proc.pid)[1:2]:  # [bwrap's init, the worker, ...]
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
        """Write a file into /mnt/data (owned by the container's uid); returns its path inside."""
        rel = files.safe_name(name)
        target = self.workdir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, data)
            if self._uid is not None:
                os.fchown(fd, self._uid, self._uid)
        finally:
            os.close(fd)
        return f"/mnt/data/{rel}"

    def read_file(self, name: str, max_bytes: int = 512 * MiB) -> bytes:
        return files.read_file(self.workdir, name, max_bytes)

    def close(self) -> None:
        """Stop the worker and delete the work directory."""
        with self._lock:
            self._kill()
            shutil.rmtree(self.workdir.parent, ignore_errors=True)
            if self._uid is not None:
                _uids.give_back(self._uid)
                self._uid = None


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


def _make_cgroups(container_id: str, config: SandboxConfig) -> list[Path]:
    """Memory and pids cgroups (v1 layout, as on this machine kind); absent or read-only cgroups are skipped."""
    made: list[Path] = []
    limits = config.limits
    for controller, settings in (("memory", {"memory.limit_in_bytes": limits.memory_mb * MiB}),
                                 ("pids", {"pids.max": limits.pids})):
        group = Path("/sys/fs/cgroup") / controller / "smolrun" / container_id
        try:
            group.mkdir(parents=True, exist_ok=True)
            for name, value in settings.items():
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
