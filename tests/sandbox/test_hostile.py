"""Hostile code: every attack is contained and the container (and this host process) stays usable."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from smolrun.errors import InvalidRequest
from smolrun.sandbox import Container
from smolrun.sandbox.container import _alive, release_directory
from smolrun.sandbox.files import read_file
from tests.sandbox.conftest import needs_root

SECRET = "smolrun-host-secret-7f3a"
os.environ["SMOLRUN_TEST_SECRET"] = SECRET  # must never be visible inside


def healthy(box: Container) -> None:
    result = box.run("1 + 1")
    assert result.result == "2" and result.error is None


def run_ok(box: Container, code: str) -> str:
    result = box.run(code)
    assert result.error is None, result.error
    return result.logs


def test_a_timeout_interrupts_even_when_the_server_started_with_sigint_ignored(sandbox_config) -> None:  # type: ignore[no-untyped-def]
    import signal

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under `server &` in a shell without job control
    try:
        box = Container(sandbox_config, preload=()).start()  # the sandbox inherits the ignored SIGINT
    finally:
        signal.signal(signal.SIGINT, before)
    try:
        box.run("kept = 7")
        result = box.run("while True:\n    pass")
        outcome = (result.timed_out, result.state_lost, result.error and result.error.name)
        assert outcome == (True, False, "TimeoutError")
        assert box.run("kept").result == "7"
    finally:
        box.close()


def test_infinite_loop_is_interrupted_and_state_kept(box: Container) -> None:
    box.run("kept = 7")
    result = box.run("while True:\n    pass")
    assert result.timed_out and not result.state_lost and result.error and result.error.name == "TimeoutError"
    assert box.run("kept").result == "7"


def test_code_ignoring_interrupts_is_killed_and_restarted(box: Container) -> None:
    box.run("kept = 7")
    result = box.run("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: time.sleep(1)")
    assert result.timed_out and result.state_lost and result.error and "restarted" in result.error.value
    assert box.run("kept").error is not None  # the namespace is gone, as reported
    healthy(box)


def test_fork_bomb(box: Container) -> None:
    result = box.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        break")
    assert result.duration_s < 10
    healthy(box)


def test_thread_bomb(box: Container) -> None:
    result = box.run("import threading, time\n"
                     "while True: threading.Thread(target=time.sleep, args=(30,), daemon=True).start()")
    assert result.error is not None and result.error.name in {"RuntimeError", "MemoryError", "SandboxRestarted"}
    healthy(box)


def test_a_cell_that_breaks_ipython_itself_gets_the_first_failure_as_its_error(box: Container) -> None:
    # What a thread or memory bomb can do at random inside IPython's own bookkeeping, here on purpose.
    box.run("ip = get_ipython()\ndef broken(*args, **kwargs):\n    try:\n        1 / 0\n    finally:\n"
            "        undefined_name\nip.run_cell = broken")
    result = box.run("1 + 1")
    assert result.error is not None and (result.error.name, result.error.value) == (
        "ZeroDivisionError", "division by zero")
    assert not result.state_lost


def test_memory_bomb(box: Container) -> None:
    result = box.run("hog = []\nwhile True: hog.append(bytearray(32 * 1024 * 1024))")
    assert result.error is not None and result.error.name in {"MemoryError", "SandboxRestarted"}
    box.run("hog = None")
    healthy(box)


@pytest.mark.parametrize("where", ["/tmp", "/dev/shm"])
def test_filling_tmpfs_stops_at_its_size(box: Container, where: str) -> None:
    # Many files, each below the per-file limit, so the tmpfs size is what stops them.
    logs = run_ok(box, f"import errno, itertools\ntry:\n    for i in itertools.count():\n"
                       f"        with open(f'{where}/fill{{i}}', 'wb') as f: f.write(b'x' * 4 * 1024 * 1024)\n"
                       "except OSError as e: print(errno.errorcode[e.errno])")
    assert logs.strip() == "ENOSPC"
    healthy(box)


def test_sysv_shared_memory_is_denied(box: Container) -> None:
    logs = run_ok(box, "import ctypes, ctypes.util\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                       "print(libc.shmget(0, 256 * 1024 * 1024, 0o1000 | 0o600), ctypes.get_errno())")
    assert logs.split() == ["-1", "1"]  # EPERM


def test_huge_stdout_is_truncated(box: Container) -> None:
    result = box.run("for i in range(200000): print('spam spam spam', i)")
    assert len(result.logs) < 4300 and "truncated" in result.logs and "199999" in result.logs
    healthy(box)


def test_huge_raw_fd_writes_are_truncated(box: Container) -> None:
    result = box.run("import os\nfor _ in range(2000): os.write(1, b'z' * 8192)\nos.write(2, b'END')")
    assert len(result.logs) < 4300 and result.logs.endswith("END")


@pytest.mark.parametrize("path", ["/etc/evil", "/usr/evil", "/evil", "/proc/sys/kernel/evil"])
def test_writing_outside_the_work_dir_fails(box: Container, path: str) -> None:
    logs = run_ok(box, f"try:\n    open('{path}', 'w').write('x')\n    print('WROTE')\nexcept OSError as e: print(e)")
    assert "WROTE" not in logs


def test_reading_host_secrets_fails(box: Container) -> None:
    server_file = Path(__file__).resolve()
    logs = run_ok(box, "import os\nfor p in ['/etc/shadow', '/etc/passwd', '/root/.bashrc', "
                       f"'{server_file}', '/var/lib/smolrun']:\n"
                       "    print(p, os.path.exists(p))")
    assert "True" not in logs


def test_no_server_secret_in_any_visible_environment(box: Container) -> None:
    logs = run_ok(box, "import os, glob\nfor p in glob.glob('/proc/*/environ'):\n"
                       "    try: print(open(p, 'rb').read())\n    except OSError: pass\nprint(dict(os.environ))")
    assert SECRET not in logs and "SMOLRUN_TEST_SECRET" not in logs
    assert "ROOT" not in run_ok(box, "import os; print(sorted(os.environ))").upper().replace("PYTHON", "")


def test_no_network_at_all(box: Container) -> None:
    logs = run_ok(box, "import socket\n"
                       "for family in (socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK, socket.AF_PACKET):\n"
                       "    try: socket.socket(family, socket.SOCK_STREAM if family != socket.AF_NETLINK else "
                       "socket.SOCK_RAW); print('OPENED', family)\n    except OSError as e: print('denied', e.errno)\n"
                       "try: socket.getaddrinfo('example.com', 80); print('RESOLVED')\nexcept OSError: print('no dns')")
    assert "OPENED" not in logs and "RESOLVED" not in logs and logs.count("denied") == 4


def test_background_processes_do_not_outlive_the_container(sandbox_config) -> None:  # type: ignore[no-untyped-def]
    box = Container(sandbox_config, preload=()).start()
    box.run("import subprocess\np = subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
            "import os\nif os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(1000)")
    uid = box._uid
    box.close()

    def leftovers() -> list[Path]:
        return [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmd(p).startswith("sleep 1000")]

    deadline = time.monotonic() + 10  # the kernel reaps the pid namespace as it likes: poll, never a fixed wait
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leftovers()
    if uid is not None:
        # Zombies are dead (they only wait for a reaper outside the sandbox's control).
        assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _owner(p) == uid and _alive(int(p.name))]


def _cmd(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _owner(proc: Path) -> int | None:
    try:
        return proc.stat().st_uid
    except OSError:
        return None


def test_killing_the_parent_and_everything_visible(box: Container) -> None:
    logs = run_ok(box, "import os, signal\nfor pid in (1, os.getppid()):\n"
                       "    try: os.kill(pid, signal.SIGKILL); print('sent', pid)\n    except OSError as e: print(e)\n"
                       "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit())[:3])")
    assert str(os.getpid()) not in logs.split()
    box.run("import os, signal\ntry: os.kill(-1, signal.SIGKILL)\nexcept OSError: pass")
    result = box.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert result.state_lost and result.error is not None and result.error.name == "SandboxRestarted"
    healthy(box)
    assert os.getpid() > 0  # this process (the server's stand-in) is untouched


def test_ctypes_system_and_os_system_run_unprivileged(box: Container) -> None:
    logs = run_ok(box, "import ctypes, os\nctypes.CDLL(None).system(b'cat /etc/shadow; id -u')\n"
                       "os.system('cat /etc/shadow; echo uid=$(id -u)')")
    assert "root:" not in logs and "uid=0" not in logs


@needs_root
def test_runs_as_an_unprivileged_uid_without_capabilities(box: Container) -> None:
    logs = run_ok(box, "import os\nprint(os.getuid(), os.geteuid(), open('/proc/self/status').read())")
    uid = int(logs.split()[0])
    assert uid != 0 and "CapEff:\t0000000000000000" in logs


def test_setuid_binaries_and_mount_do_not_escalate(box: Container) -> None:
    logs = run_ok(box, "import subprocess\nfor cmd in (['su', '-c', 'id -u'], ['mount', '-t', 'tmpfs', 'x', '/mnt'],"
                       " ['chroot', '/', 'true']):\n"
                       "    try: r = subprocess.run(cmd, capture_output=True, text=True, timeout=3); "
                       "print(cmd[0], r.returncode)\n    except OSError as e: print(cmd[0], 'missing', e.errno)")
    assert all(line.split()[1] != "0" for line in logs.strip().splitlines())


def test_nested_namespaces_are_refused(box: Container) -> None:
    logs = run_ok(box, "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                       "for flag in (0x10000000, 0x20000000, 0x00020000, 0x40000000):\n"  # user, pid, mount, net
                       "    print(libc.unshare(flag), ctypes.get_errno())\n"
                       "import subprocess\nprint(subprocess.run(['unshare', '-r', 'true']).returncode)")
    lines = [line for line in logs.strip().splitlines() if not line.startswith("unshare:")]  # its stderr
    assert all(line.split()[0] == "-1" for line in lines[:4]) and lines[4] != "0"


def test_ptrace_is_denied(box: Container) -> None:
    logs = run_ok(box, "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                       "print(libc.ptrace(16, 1, 0, 0), ctypes.get_errno())")  # PTRACE_ATTACH to init
    assert logs.split() == ["-1", "1"]


def test_io_uring_and_bpf_are_denied(box: Container) -> None:
    logs = run_ok(box, "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                       "print(libc.syscall(425, 8, 0), ctypes.get_errno())\n"  # io_uring_setup
                       "print(libc.syscall(321, 0, 0, 0), ctypes.get_errno())")  # bpf
    assert logs.split() == ["-1", "1", "-1", "1"]


def test_typing_into_a_terminal_is_denied(box: Container) -> None:
    logs = run_ok(box, "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nc = ctypes.c_char(b'x')\n"
                       "print(libc.ioctl(0, 0x5412, ctypes.byref(c)), ctypes.get_errno())\n"  # TIOCSTI
                       "print(libc.ioctl(0, 0x541C, ctypes.byref(c)), ctypes.get_errno())")  # TIOCLINUX
    assert logs.split() == ["-1", "1", "-1", "1"]  # EPERM from seccomp, not ENOTTY from the pipe


def test_planted_symlinks_are_never_followed_by_the_host(box: Container) -> None:
    run_ok(box, "import os\nos.symlink('/etc/shadow', 'leak.txt')\nos.symlink('/etc', 'etc')")
    for name in ("leak.txt", "etc/shadow", "etc/passwd"):
        with pytest.raises(InvalidRequest):
            read_file(box.workdir, name, 1 << 20)


def test_planted_fifo_cannot_hang_the_host(box: Container) -> None:
    run_ok(box, "import os\nos.mkfifo('report.csv')")
    started = time.monotonic()
    with pytest.raises(InvalidRequest, match="not a regular file"):
        read_file(box.workdir, "report.csv", 1 << 20)
    assert time.monotonic() - started < 1


def test_path_traversal_names_are_refused(box: Container) -> None:
    for name in ("../../etc/passwd", "/etc/passwd", "a/../../x", ""):
        with pytest.raises(InvalidRequest):
            read_file(box.workdir, name, 1 << 20)


def test_one_huge_file_stops_at_the_file_size_limit(box: Container) -> None:
    logs = run_ok(box, "import errno\ntry:\n    with open('big.bin', 'wb') as f:\n"
                       "        for _ in range(64): f.write(b'x' * 1024 * 1024)\n"
                       "except OSError as e: print(errno.errorcode[e.errno])")
    assert logs.strip() == "EFBIG"


def test_too_many_files_are_reported_over_quota(box: Container) -> None:
    result = box.run("for i in range(80): open(f'f{i}.txt', 'w').write('x')")
    assert result.error is not None and result.error.name == "QuotaExceeded"


@needs_root
def test_cgroup_limits_memory_including_tmpfs(box: Container) -> None:
    assert box._cgroups, "cgroup v1 memory/pids are expected on this machine kind"
    result = box.run("import numpy as np\nblocks = [np.ones(32 * 1024 * 1024 // 8) for _ in range(20)]")
    assert result.error is not None
    healthy(box)


@needs_root
def test_code_cannot_climb_out_of_its_cpu_share(box: Container) -> None:
    cpu = next(g for g in box._cgroups if g.parent.parent.name == "cpu")
    assert (cpu.parent / "cpu.shares").read_text() == "110\n"  # all code as one task at nice 10 beside the model
    # A new session (a fresh autogroup at nice 0 outside a cgroup) and the autogroup's nice lowered: the cpu
    # cgroup holds every process regardless, and the cell cannot see or leave it.
    logs = run_ok(box, "import os, subprocess\nopen('/proc/self/autogroup', 'w').write('0')\n"
                       "child = subprocess.Popen(['sleep', '30'], start_new_session=True)\n"
                       "print(os.getsid(child.pid) == child.pid)")
    assert logs.split() == ["True"]
    inside = {int(p) for p in (cpu / "cgroup.procs").read_text().split()}
    assert len(inside) == 4, inside  # bwrap, the supervisor, the worker, and the child in its own session
    memory = next(g for g in box._cgroups if g.parent.parent.name == "memory")
    assert inside == {int(p) for p in (memory / "cgroup.procs").read_text().split()}
    healthy(box)


def test_a_tree_too_deep_for_shutil_goes_with_its_container(sandbox_config) -> None:  # type: ignore[no-untyped-def]
    # shutil.rmtree recurses once per level: 1100 levels raised RecursionError, and the container stayed on disk.
    config = replace(sandbox_config, limits=replace(sandbox_config.limits, work_files=1200))
    box = Container(config).start()
    directory = box.workdir.parent
    try:
        logs = run_ok(box, "import os\nfor _ in range(1100):\n    os.mkdir('d')\n    os.chdir('d')\n"
                           "os.symlink('/etc', 'etc')\nprint(len(os.getcwd()))")
        assert logs.split() == [str(len("/mnt/data") + 2 * 1100)]
        box.close(keep_files=True)  # a server stopping: the tree is on disk now, a plain directory
        assert (directory / "data" / "d" / "d").is_dir() and not os.path.ismount(directory / "data")
        release_directory(directory)  # the container deleted by a later server
        assert not directory.exists()
        assert os.path.isdir("/etc/ssl")  # the planted link went, never what it points to
    finally:
        box.close()
