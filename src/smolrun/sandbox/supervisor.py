# mypy: ignore-errors
# (runs inside the sandbox, under its own interpreter, as bwrap's pid 1)
"""Runs inside the sandbox as pid 1: the only holder of the host channel, the worker's parent and its censor.

User code runs in the worker (a child process). It can write anything to its own reply pipe, so nothing
the worker says is trusted: this process reads the worker's stdout and stderr itself (the logs cannot be
forged or grow past the cap), accepts exactly one bounded, well-formed reply per request, and treats
anything else (a frame too large, malformed JSON, a second frame, a frame while idle) as tampering: it
tells the host why and exits, which ends the sandbox. It is not dumpable, so the worker (same uid, no
capabilities) cannot open /proc/1/fd to reach the host channel; ptrace is denied by seccomp. It runs no
user code. Only the standard library is used; the host passes the worker's source as argv[1].
"""

import base64
import binascii
import ctypes
import json
import os
import select
import signal
import struct
import sys
import time

PR_SET_DUMPABLE = 4
MAX_REQUEST = 64 * 1024 * 1024
MAX_WORKER_FRAME = 48 * 1024 * 1024  # the worker's reply: clipped strings plus images
MAX_IMAGES = 32
MAX_IMAGE_BYTES = 16 * 1024 * 1024  # all images of one call, decoded
DRAIN_S = 0.05  # after the reply, how long output still arriving is collected


class Tampered(Exception):
    pass


def _joined(head, tail, total):
    if total <= len(head) + len(tail):
        return (head + tail).decode("utf-8", errors="replace")
    return (f"{head.decode('utf-8', errors='replace')}\n[... {total - len(head) - len(tail)} bytes of output "
            f"truncated ...]\n{tail.decode('utf-8', errors='replace')}")


class Capture:
    """A cell's stdout and stderr: the first and last `limit // 2` bytes, and how many there were."""

    def __init__(self, limit):
        self.half = max(limit // 2, 1)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, chunk):
        self.total += len(chunk)
        room = self.half - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            del self.tail[:-self.half]

    def text(self):
        return _joined(bytes(self.head), bytes(self.tail), self.total)


class Frames:
    """Length-prefixed frames read from a descriptor, each at most `limit` bytes."""

    def __init__(self, fd, limit):
        self.fd = fd
        self.limit = limit
        self.buffer = bytearray()
        self.closed = False

    def feed(self):
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            self.closed = True
        self.buffer += chunk

    def frame(self):
        """A complete frame, or None; Tampered when the announced size is over the limit."""
        if len(self.buffer) < 4:
            return None
        (size,) = struct.unpack(">I", self.buffer[:4])
        if size > self.limit:
            raise Tampered(f"a reply of {size} bytes was announced (the limit is {self.limit})")
        if len(self.buffer) < 4 + size:
            return None
        body = bytes(self.buffer[4:4 + size])
        del self.buffer[:4 + size]
        return body


def _write(fd, message):
    data = json.dumps(message).encode()
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _checked(body, limit, seq):
    """The worker's reply, as the host may see it: known keys of the right types, clipped sizes, PNG images."""
    try:
        reply = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Tampered("the reply is not JSON") from None
    if not isinstance(reply, dict):
        raise Tampered("the reply is not an object")
    if reply.get("seq") != seq:
        raise Tampered(f"a reply to request {reply.get('seq')!r} came while request {seq!r} was pending")
    longest = limit + 100  # the worker clips to `limit` bytes, plus its note of what it left out

    def text(value, what, optional=False):
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > longest:
            raise Tampered(f"'{what}' is not a string of at most {longest} characters")
        return value

    error = reply.get("error")
    if error is not None:
        if not isinstance(error, dict):
            raise Tampered("'error' is not an object")
        error = {key: text(error.get(key), f"error.{key}") for key in ("name", "value", "traceback")}
    images = reply.get("images", [])
    if not isinstance(images, list) or len(images) > MAX_IMAGES:
        raise Tampered(f"'images' is not a list of at most {MAX_IMAGES}")
    total = 0
    for image in images:
        try:
            png = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise Tampered("an image is not base64") from None
        total += len(png)
        if total > MAX_IMAGE_BYTES or not png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise Tampered(f"the images are not PNG files of at most {MAX_IMAGE_BYTES} bytes in all")
    return {"result": text(reply.get("result"), "result", optional=True), "error": error, "images": images,
            "text": text(reply.get("text", ""), "text")}


class Supervisor:
    def __init__(self, worker_source):
        ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        self.host_in, self.host_out = 0, 1
        request_r, self.request_w = os.pipe()
        self.reply_r, reply_w = os.pipe()
        self.output_r, output_w = os.pipe()
        os.set_inheritable(request_r, True)  # pipes are close-on-exec; the worker keeps these two
        os.set_inheritable(reply_w, True)
        null = os.open("/dev/null", os.O_RDONLY)
        self.worker = os.fork()
        if self.worker == 0:
            os.dup2(null, 0)
            os.dup2(output_w, 1)
            os.dup2(output_w, 2)
            low, high = sorted((request_r, reply_w))
            os.closerange(3, low)
            os.closerange(low + 1, high)
            os.closerange(high + 1, 65536)
            os.execv(sys.executable, [sys.executable, "-I", "-c", worker_source, str(request_r), str(reply_w)])
        for fd in (null, request_r, reply_w, output_w):
            os.close(fd)
        self.output_open = True
        self.extra_reply = False  # the worker wrote more after the reply just read
        self.replies = Frames(self.reply_r, MAX_WORKER_FRAME)
        self.requests = Frames(self.host_in, MAX_REQUEST)
        signal.signal(signal.SIGINT, self._forward_interrupt)

    def _forward_interrupt(self, signum, frame):
        try:
            os.kill(self.worker, signal.SIGINT)
        except ProcessLookupError:
            pass

    def _reap(self):
        """As pid 1, collect every exited process (orphans of the worker's children are ours)."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def _wait(self, want_request, capture):
        """Serve the pipes until the host sends a request (want_request) or the worker replies."""
        while True:
            watched = [self.host_in, self.reply_r] + ([self.output_r] if self.output_open else [])
            ready = select.select(watched, [], [], 0.5)[0]
            self._reap()
            if self.output_r in ready:
                chunk = os.read(self.output_r, 1 << 16)
                self.output_open = bool(chunk)  # every writer closed it: stop watching an endless EOF
                if capture is not None:
                    capture.add(chunk)
            if self.reply_r in ready:
                self.replies.feed()
                if not want_request:
                    body = self.replies.frame()
                    if body is not None:
                        # More after it is tampering too, said once the first reply is checked: a reply to
                        # another request is the more telling of the two, whatever the pipe held at once.
                        self.extra_reply = bool(self.replies.buffer)
                        return body
                elif self.replies.buffer:
                    raise Tampered("a reply was written while no request was pending")
                if self.replies.closed:
                    return None  # the worker died
            if self.host_in in ready:
                self.requests.feed()
                if self.requests.closed:
                    return None  # the host is gone
                if want_request:
                    body = self.requests.frame()
                    if body is not None:
                        return body

    def _drain(self, capture):
        deadline = time.monotonic() + DRAIN_S
        while self.output_open and time.monotonic() < deadline and select.select([self.output_r], [], [], 0)[0]:
            chunk = os.read(self.output_r, 1 << 16)
            self.output_open = bool(chunk)
            capture.add(chunk)

    def _forward(self, body):
        view = memoryview(struct.pack(">I", len(body)) + body)
        while view:
            view = view[os.write(self.request_w, view):]

    def _single(self):
        if self.extra_reply:
            raise Tampered("more than one reply was written for one request")

    def serve(self):
        ready = self._wait(False, None)
        if ready is None:
            return
        _checked(ready, 0, None)  # the worker's hello: well-formed, nothing more
        self._single()
        _write(self.host_out, {"ready": True})
        while (body := self._wait(True, None)) is not None:
            request = json.loads(body)
            seq = request.get("seq")
            limit = int(request.get("output_limit", 20000))
            capture = Capture(limit)
            self._forward(body)
            reply_body = self._wait(False, capture)
            if reply_body is None:
                return  # the worker died: the host restarts the sandbox
            self._drain(capture)
            reply = _checked(reply_body, limit, seq)
            self._single()
            logs = capture.text() + reply.pop("text")
            _write(self.host_out, {"seq": seq, "logs": logs, **reply})


def main():
    supervisor = Supervisor(sys.argv[1])
    try:
        supervisor.serve()
    except Tampered as why:
        try:
            _write(supervisor.host_out, {"fatal": f"the code tampered with the sandbox's result channel: {why}"})
        except OSError:
            pass
    finally:
        try:
            os.kill(supervisor.worker, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # Exiting as pid 1 ends the sandbox: the kernel kills every process left in its pid namespace.


main()
