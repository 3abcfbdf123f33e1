"""Hostile code against the host's side of a container: its result channel, its work dir, its quota."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from smolrun.errors import InvalidRequest
from smolrun.sandbox import Container
from smolrun.sandbox.container import MAX_FRAME, _ChannelBroken, _descendants, _parse_reply
from smolrun.sandbox.files import display, listing, parse

# The worker's reply descriptor is argv[2] of its process: user code finds it as easily as any other way.
FORGE = ("import json, os, struct, sys\nfd = int(sys.argv[2])\n"
         "def frame(message):\n    body = json.dumps(message).encode()\n"
         "    os.write(fd, struct.pack('>I', len(body)) + body)\n")


def _restarted_for_tampering(result) -> bool:  # type: ignore[no-untyped-def]
    return (result.state_lost and result.error is not None and result.error.name == "SandboxRestarted"
            and "tampered with the sandbox's result channel" in result.error.value)


def test_a_forged_oversized_reply_kills_the_container_cleanly(box: Container) -> None:
    result = box.run(FORGE + "frame({'result': 'forged', 'text': 'x' * 5_000_000})")
    assert _restarted_for_tampering(result) and result.result is None and result.logs == ""
    assert box.run("'after'").result == "'after'"


def test_an_announced_huge_reply_is_never_read(box: Container) -> None:
    result = box.run(FORGE + "os.write(fd, struct.pack('>I', 256 * 1024 * 1024))\nimport time\ntime.sleep(30)")
    assert _restarted_for_tampering(result) and "268435456 bytes was announced" in result.error.value  # type: ignore[union-attr]
    assert box.run("1 + 1").result == "2"


def test_a_reply_for_no_pending_request_is_tampering(box: Container) -> None:
    result = box.run(FORGE + "frame({'result': \"'forged'\"})\nimport time\ntime.sleep(30)")
    assert _restarted_for_tampering(result) and "a reply to request None came while request" in result.error.value  # type: ignore[union-attr]


def _seq(box: Container) -> str:
    """The next request's sequence number: predictable (it counts up), so a forged reply can carry it."""
    return f"seq = {box._seq + 1}\n"


def test_a_well_forged_reply_then_the_real_one_never_answers_a_later_call(box: Container) -> None:
    first = box._seq + 1
    forged = box.run(FORGE + _seq(box) + "frame({'seq': seq, 'result': \"'forged'\"})\nimport time\ntime.sleep(1000)")
    assert forged.result == "'forged'"  # what the code chose to say about itself, bounded like any result
    # The cell is still running: the next request waits, times out, and the interrupted cell's real reply
    # (to the earlier request) is refused instead of being taken as this call's answer.
    second = box.run("'second'")
    assert _restarted_for_tampering(second) and second.result is None
    assert f"a reply to request {first} came while request {first + 1} was pending" in second.error.value  # type: ignore[union-attr]
    third = box.run("'third'")
    assert (third.result, third.state_lost, third.logs) == ("'third'", False, "")


def test_a_reply_while_idle_ends_the_container_and_the_next_call_says_why(box: Container) -> None:
    forged = box.run(FORGE + _seq(box) + "frame({'seq': seq, 'result': \"'forged'\"})\nimport os, time\n"
                     "while not os.path.exists('go'): time.sleep(0.01)")
    assert forged.result == "'forged'"
    box.put_file("go", b"")  # the cell ends and its real reply arrives while nothing is pending
    assert box._proc is not None
    os.waitid(os.P_PID, box._proc.pid, os.WEXITED | os.WNOWAIT)  # the supervisor ends the sandbox
    second = box.run("'second'")
    assert second.state_lost and second.result == "'second'" and second.error is None
    assert second.logs.startswith("[the code tampered with the sandbox's result channel: a reply was written while "
                                  "no request was pending; it was restarted")


def test_the_host_channel_is_out_of_reach_of_user_code(box: Container) -> None:
    assert box._proc is not None and box._proc.stdin is not None and box._proc.stdout is not None
    host_pipes = {os.fstat(f.fileno()).st_ino for f in (box._proc.stdin, box._proc.stdout)}
    logs = box.run("import os\nseen, refused = set(), []\n"
                   "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
                   "    try:\n        fds = os.listdir(f'/proc/{pid}/fd')\n"
                   "    except OSError:\n        refused.append(int(pid))\n        continue\n"
                   "    for fd in fds:\n        try: seen.add(os.readlink(f'/proc/{pid}/fd/{fd}'))\n"
                   "        except OSError: pass\n"
                   "print(sorted(refused))\nprint(sorted(s for s in seen if s.startswith('pipe:')))").logs
    refused, pipes = logs.splitlines()
    assert refused == "[1]"  # the supervisor, which alone holds the channel, is not dumpable
    assert not {f"pipe:[{ino}]" for ino in host_pipes} & set(eval(pipes))


def test_host_reads_of_the_channel_are_bounded() -> None:
    box = Container.__new__(Container)  # only the reading side: a fake sandbox that announces 256 MiB
    box._proc = subprocess.Popen([sys.executable, "-c", "import sys, struct, time\n"
                                  "sys.stdout.buffer.write(struct.pack('>I', 256 << 20)); sys.stdout.flush()\n"
                                  "time.sleep(30)"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        with pytest.raises(_ChannelBroken, match=f"the limit is {MAX_FRAME}"):
            box._receive_frame(time.monotonic() + 30)
    finally:
        box._proc.kill()
        box._proc.wait()
        box._proc.stdin.close()  # type: ignore[union-attr]
        box._proc.stdout.close()  # type: ignore[union-attr]


@pytest.mark.parametrize(("body", "message"), [
    (b"not json", "not JSON"),
    (b"[1]", "not an object"),
    (b'{"seq": 6, "logs": "", "images": []}', "answered request 6 instead of 7"),
    (b'{"seq": 7, "images": "abc"}', "malformed images"),
    (b'{"seq": 7, "images": ["!!"]}', "not base64"),
    (b'{"seq": 7, "images": [], "error": "x"}', "malformed error"),
    (b'{"fatal": "why"}', "why"),
])
def test_malformed_replies_break_the_channel(body: bytes, message: str) -> None:
    with pytest.raises(_ChannelBroken, match=message):
        _parse_reply(body, 7, 100)


def test_reply_texts_are_clipped_by_the_host_too() -> None:
    reply = _parse_reply(b'{"seq": 1, "logs": "' + b"a" * 5000 + b'", "result": 3, "images": []}', 1, 100)
    assert (len(reply.logs), reply.result) == (400, None)


def test_a_worker_killed_while_idle_reports_state_lost(box: Container) -> None:
    box.run("kept = 1")
    assert box._proc is not None
    worker = _descendants(box._proc.pid)[1]  # [the supervisor, the worker]
    os.kill(worker, signal.SIGKILL)
    os.waitid(os.P_PID, box._proc.pid, os.WEXITED | os.WNOWAIT)  # the sandbox ends with its worker
    result = box.run("'fresh'")
    assert result.state_lost and result.result == "'fresh'" and result.error is None
    assert result.logs.startswith("[the container's Python process had stopped; it was restarted")
    assert box.run("kept").error.name == "NameError"  # type: ignore[union-attr]


# -- the work dir ----------------------------------------------------------------------------------------

def _in_thread(fn, *args):  # type: ignore[no-untyped-def]
    """fn(*args) on a daemon thread: a call that blocked forever would fail the test instead of hanging it."""
    outcome: list[object] = []
    worker = threading.Thread(target=lambda: outcome.append(_capture(fn, *args)), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), f"{fn.__name__} blocked"
    return outcome[0]


def _capture(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc


@pytest.mark.parametrize(("plant", "kind"), [("os.mkfifo('f.csv')", "FIFO"),
                                              ("os.symlink('/etc/passwd', 'f.csv')", "symbolic link"),
                                              ("os.mkdir('f.csv')", "directory")])
def test_uploads_over_planted_names_never_block_or_write_through(box: Container, plant: str, kind: str) -> None:
    assert box.run(f"import os\n{plant}").error is None
    outcome = _in_thread(box.put_file, "f.csv", b"a,b\n")
    assert isinstance(outcome, InvalidRequest)
    assert outcome.message == (f"/mnt/data/f.csv already exists and is a {kind}, not a regular file: delete it "
                               "first")
    assert os.listdir(box.workdir) == ["f.csv"]  # no temporary left behind


def test_uploads_replace_a_regular_file(box: Container) -> None:
    box.put_file("notes.txt", b"old")
    assert box.put_file("dir/notes.txt", b"new") == "/mnt/data/notes.txt"  # the base name, as at OpenAI
    assert box.read_file("notes.txt") == b"new"


@pytest.mark.parametrize(("name", "message"), [(".", "give the file a printable name"),
                                                ("a\nb", "give the file a printable name"),
                                                ("x" * 300, "300 bytes long; the limit is 255")])
def test_bad_upload_names_are_refused(box: Container, name: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        box.put_file(name, b"x")


def test_names_are_shown_escaped_and_read_back() -> None:
    for raw in (b"plain.txt", b"\xff\xfe.bin", b"back\\slash", b"\\xff", "日本.txt".encode()):
        assert parse(display(raw)) == raw
    assert display(b"\xff\xfe.bin") == "\\xff\\xfe.bin" and display(b"\\xff") == "\\\\xff"


DEEP = "import os\nfor i in range(20):\n    os.mkdir('d' * 250)\n    os.chdir('d' * 250)\n" \
       "open('deep.txt', 'w').write('bottom')\nos.chdir('/mnt/data')\nopen(b'\\xff\\xfe.bin', 'wb').write(b'raw')"


def test_paths_past_path_max_and_undecodable_names_are_listed_and_read(box: Container) -> None:
    made = box.run(DEEP)
    deep = "/".join(["d" * 250] * 20) + "/deep.txt"
    assert made.error is None and set(made.files) == {deep, "\\xff\\xfe.bin"}
    assert len(deep) > os.pathconf("/", "PC_PATH_MAX")
    assert box.read_file(deep) == b"bottom" and box.read_file("\\xff\\xfe.bin") == b"raw"
    assert box.run("1 + 1").result == "2"


def test_the_file_quota_holds_during_the_call(box: Container) -> None:
    result = box.run("import errno\nmade = 0\ntry:\n    for i in range(30000):\n"
                     "        open(f'f{i}', 'w').close()\n        made += 1\n"
                     "except OSError as e:\n    print(made, errno.errorcode[e.errno])")
    limits = box.config.limits
    assert result.logs == f"{limits.work_files} ENOSPC\n"
    assert result.error is not None and result.error.name == "QuotaExceeded"
    assert listing(box.workdir, 100_000).entries == limits.work_files
    box.close()
    assert not box.workdir.parent.exists()


def test_the_quota_holds_for_background_processes(box: Container) -> None:
    box.run("import subprocess\nsubprocess.Popen(['sh', '-c', 'i=0; while :; do i=$((i+1)); : > bg$i || exit; done'],"
            " start_new_session=True)\nimport time\ntime.sleep(1)")
    assert listing(box.workdir, 100_000).entries == box.config.limits.work_files


def test_without_a_quota_tmpfs_the_call_is_stopped_over_quota(sandbox_config) -> None:  # type: ignore[no-untyped-def]
    box = Container(replace(sandbox_config, quota_tmpfs=False), preload=()).start()
    try:
        result = box.run("import itertools\nfor i in itertools.count(): open(f'f{i}', 'w').close()")
        assert result.error is not None and result.error.name == "QuotaExceeded" and not result.timed_out
        assert box.run("1 + 1").result == "2"  # interrupted, not killed: the container is still usable
    finally:
        box.close()
    assert not box.workdir.parent.exists()
