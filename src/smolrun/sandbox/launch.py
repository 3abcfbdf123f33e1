"""Start one sandboxed worker: bwrap namespaces and mounts, seccomp, rlimits, cgroup, unprivileged uid."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from smolrun.sandbox.seccomp import bpf_file

WORKER_SOURCE = (Path(__file__).parent / "worker.py").read_text()
SUPERVISOR_SOURCE = (Path(__file__).parent / "supervisor.py").read_text()
MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Per-container limits; the defaults suit a laptop."""

    memory_mb: int = 1024  # cgroup memory (counts tmpfs and shm) and, + 512 MiB, the address space
    timeout_s: float = 60.0  # per call: SIGINT, then kill and restart after `grace_s`
    grace_s: float = 2.0
    output_bytes: int = 20_000  # captured stdout+stderr per call (head and tail kept)
    tmp_mb: int = 256  # /tmp tmpfs
    shm_mb: int = 64  # /dev/shm tmpfs
    file_mb: int = 256  # largest file the code may write (RLIMIT_FSIZE)
    work_files: int = 1000  # files in /mnt/data
    work_mb: int = 1024  # bytes in /mnt/data
    pids: int = 128  # processes and threads
    open_files: int = 256
    cpu_s: int = 3600  # CPU seconds over the container's life
    # Below the model on the CPU: llama.cpp's threads wait for each other at every layer, so a cell that takes
    # one of their cores away stalls the whole forward pass; niced and SCHED_BATCH, the cell uses what is left.
    nice: int = 10
    idle_s: float = 1200.0  # a container unused this long expires


@dataclass(frozen=True)
class SandboxConfig:
    python: Path  # the sandbox's interpreter (a venv made from /usr/bin/python3 with numpy, pandas, ...)
    root: Path  # where container work directories live on the host
    limits: Limits = Limits()
    bwrap: str = "bwrap"
    quota_tmpfs: bool = True  # where the host may mount: /mnt/data is a tmpfs sized to the quota (storage.py)


def default_config() -> SandboxConfig:
    """Root: a system location readable by the unprivileged sandbox uids; otherwise the user's data dir."""
    if os.geteuid() == 0:
        base = Path("/opt/smolrun")
        root = Path("/var/lib/smolrun/containers")
    else:
        data = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "smolrun"
        base, root = data, data / "containers"
    python = Path(os.environ.get("SMOLRUN_SANDBOX_PYTHON", base / "sandbox-env" / "bin" / "python"))
    return SandboxConfig(python=python, root=Path(os.environ.get("SMOLRUN_SANDBOX_ROOT", root)))


def unavailable_reason(config: SandboxConfig) -> str | None:
    """Why code cannot run sandboxed here, or None when it can."""
    if shutil.which(config.bwrap) is None:
        how = "apt-get install bubblewrap" if shutil.which("apt-get") else "install bubblewrap"
        return f"bubblewrap (bwrap) is not installed: {how}, or run `make setup` as root"
    if not config.python.exists():
        return (f"the sandbox Python environment {config.python} is missing: run `make setup` "
                "(or set SMOLRUN_SANDBOX_PYTHON)")
    try:
        import pyseccomp  # noqa: F401
    except ImportError:
        return "pyseccomp is not installed: pip install pyseccomp"
    probe = subprocess.run([config.bwrap, "--unshare-all", "--ro-bind", "/", "/", "true"], capture_output=True,
                           text=True, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    if probe.returncode != 0:
        return f"this kernel refuses bubblewrap's namespaces ({probe.stderr.strip() or probe.returncode})"
    return None


def _mounts(config: SandboxConfig, workdir: Path) -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "lib", "lib64", "sbin"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    for etc in ("/etc/ld.so.cache", "/etc/alternatives", "/etc/fonts", "/etc/localtime", "/etc/mime.types"):
        args += ["--ro-bind-try", etc, etc]
    env_root = config.python.parent.parent  # .../sandbox-env
    if not str(env_root).startswith("/usr/"):
        args += ["--ro-bind", str(env_root), str(env_root)]
    lim = config.limits
    args += ["--proc", "/proc", "--dev", "/dev",
             "--size", str(lim.tmp_mb * MiB), "--tmpfs", "/tmp",
             "--size", str(lim.shm_mb * MiB), "--tmpfs", "/dev/shm",
             "--bind", str(workdir), "/mnt/data", "--chdir", "/mnt/data"]
    return args


def _environment(config: SandboxConfig) -> list[str]:
    env = {
        "HOME": "/mnt/data",
        "PATH": f"{config.python.parent}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": "/tmp/.matplotlib",
        "IPYTHONDIR": "/tmp/.ipython",
        "XDG_CACHE_HOME": "/tmp/.cache",  # font caches and the like stay out of the user's /mnt/data
        "XDG_CONFIG_HOME": "/tmp/.config",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    args = ["--clearenv"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    return args


def command(config: SandboxConfig, workdir: Path, seccomp_fd: int) -> list[str]:
    return [
        config.bwrap,
        # --as-pid-1: the supervisor is pid 1 itself, so no bwrap init holds the host channel where user code
        # could open it through /proc/1/fd.
        "--unshare-user", "--unshare-pid", "--as-pid-1", "--unshare-net", "--unshare-ipc", "--unshare-uts",
        # No --new-session: Popen's start_new_session already makes the sandbox its own session, with no
        # controlling terminal (and seccomp denies TIOCSTI); a second setsid inside bwrap would put the cell in a
        # fresh autogroup at nice 0, beside the model's threads, whatever its own nice (_preexec).
        "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--cap-drop", "ALL",
        *_mounts(config, workdir), *_environment(config),
        "--seccomp", str(seccomp_fd),
        "--remount-ro", "/",
        str(config.python), "-I", "-c", SUPERVISOR_SOURCE, WORKER_SOURCE,
    ]


def _preexec(uid: int | None, limits: Limits, cgroup_procs: list[Path]) -> Callable[[], None]:
    def run() -> None:
        # Order matters: join the cgroups while still root, set limits, then drop to the container uid.
        for procs in cgroup_procs:
            procs.write_text(str(os.getpid()))
        resource.setrlimit(resource.RLIMIT_AS, ((limits.memory_mb + 512) * MiB,) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * MiB,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files,) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s))
        os.nice(limits.nice)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        _nice_autogroup(limits.nice)
        resource.setrlimit(resource.RLIMIT_NICE, (0, 0))  # no way back up from inside
        if uid is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.pids, limits.pids))
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return run


def _nice_autogroup(nice: int) -> None:
    """Put this new session's autogroup at `nice` too, where the kernel groups tasks by session.

    With autogroups on (Debian's and Ubuntu's default), CFS first shares the CPU between sessions at equal
    weight and only then by nice inside each: a busy cell in its own session took half a core from the model
    whatever its nice, and decoding beside it fell to 7 % of alone (bench/cpu_share.py).
    """
    try:
        with open("/proc/self/autogroup", "w") as group:
            group.write(str(nice))
    except OSError:
        pass  # no autogroups (a kernel without them, or the server in its own cgroup): nice alone applies


def start(config: SandboxConfig, workdir: Path, uid: int | None, cgroup_procs: list[Path]) -> subprocess.Popen[bytes]:
    """Launch bwrap with the supervisor and its worker; its stdin/stdout carry the protocol."""
    fd = bpf_file()
    try:
        return subprocess.Popen(
            command(config, workdir, fd),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            pass_fds=(fd,),
            env={"PATH": "/usr/bin:/bin"},  # bwrap's own pid 1 is visible inside: give it nothing to leak
            start_new_session=True,
            preexec_fn=_preexec(uid, config.limits, cgroup_procs),
            cwd="/",
        )
    finally:
        os.close(fd)
