"""The seccomp deny-list applied inside every sandbox, compiled to BPF for `bwrap --seccomp FD`."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
import termios

# Kernel surfaces untrusted Python never needs: debugging other processes, new namespaces and mounts,
# kernel modules and keys, io_uring, SysV shared memory (escapes RLIMIT_AS), network sockets.
DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "open_by_handle_at", "name_to_handle_at", "acct", "swapon", "swapoff", "reboot", "syslog",
    "connect", "bind", "listen", "accept", "accept4",
    "shmget", "shmat", "msgget", "semget",
)

TIOCLINUX = 0x541C  # not in Python's termios


def bpf_file() -> int:
    """A file descriptor holding the compiled filter, positioned at 0, for bwrap to read."""
    import pyseccomp as sc

    f = sc.SyscallFilter(defaction=sc.ALLOW)
    for name in DENIED:
        f.add_rule(sc.ERRNO(errno.EPERM), name)
    f.add_rule(sc.ERRNO(errno.EPERM), "socket", sc.Arg(0, sc.NE, socket.AF_UNIX))
    f.add_rule(sc.ERRNO(errno.EPERM), "socketpair", sc.Arg(0, sc.NE, socket.AF_UNIX))
    # Typing into a terminal: the sandbox has none (its own session, pipes only), and these make sure.
    for request in (termios.TIOCSTI, TIOCLINUX):
        f.add_rule(sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    # glibc falls back to clone() on ENOSYS; clone3's flags live in memory that seccomp cannot inspect.
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    handle = tempfile.TemporaryFile()
    f.export_bpf(handle)
    handle.flush()
    fd = os.dup(handle.fileno())
    handle.close()
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
