# mypy: ignore-errors
# (runs inside the sandbox, under its own interpreter, with IPython objects that have no stubs)
"""Runs inside the sandbox: one persistent IPython shell; one length-prefixed JSON request per cell.

Only the standard library and IPython are needed; the host passes this file's source with `python -c`, so
nothing of the host's tree has to be mounted. Protocol on the inherited stdin/stdout, which are moved to
private descriptors before any user code runs: the cell sees /dev/null as stdin and a capture pipe as
stdout and stderr.
"""

import base64
import io
import json
import os
import queue
import select
import struct
import sys
import threading


def _read(stream):
    header = stream.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    return json.loads(stream.read(size))


def _write(stream, message):
    data = json.dumps(message).encode()
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def _joined(head, tail, total):
    """Text of at most head + tail bytes out of `total`, saying how much was left out between them."""
    if total <= len(head) + len(tail):
        return (head + tail).decode("utf-8", errors="replace")
    return (f"{head.decode('utf-8', errors='replace')}\n[... {total - len(head) - len(tail)} bytes of output "
            f"truncated ...]\n{tail.decode('utf-8', errors='replace')}")


def _clip(data, limit):
    if len(data) <= limit:
        return _joined(data, b"", len(data))
    return _joined(data[: limit // 2], data[-(limit // 2) :], len(data))


class _Capture:
    """Collects a cell's stdout and stderr through a pipe, keeping `limit` bytes: the head and the tail.

    A pipe rather than a file, so code that fills /tmp still shows its error messages. The pipe is drained
    by one thread started before any user code, so a cell that exhausts processes or threads cannot stop
    the next cell from being captured.
    """

    def __init__(self, limit):
        self.limit = limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self.read_end, self.write_end = os.pipe()
        self.closing = threading.Event()
        self.done = threading.Event()

    def drain(self):
        half = self.limit // 2
        while True:
            ready = select.select([self.read_end], [], [], 0.05)[0]
            chunk = os.read(self.read_end, 65536) if ready else None
            if chunk == b"" or (chunk is None and self.closing.is_set()):
                break  # EOF, or quiet after the cell ended (a background process may hold the pipe)
            if chunk:
                self.total += len(chunk)
                room = half - len(self.head)
                if room > 0:
                    self.head += chunk[:room]
                    chunk = chunk[room:]
                if chunk:
                    self.tail += chunk
                    del self.tail[:-half]
        os.close(self.read_end)
        self.done.set()

    def text(self):
        os.close(self.write_end)
        self.closing.set()
        self.done.wait()
        return _joined(bytes(self.head), bytes(self.tail), self.total)


def _drainer(captures):
    while True:
        captures.get().drain()


def _figures():
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return []
    images = []
    for number in plt.get_fignums():
        buffer = io.BytesIO()
        plt.figure(number).savefig(buffer, format="png")
        images.append(base64.b64encode(buffer.getvalue()).decode())
    plt.close("all")
    return images


def _run_cell(shell, request, worker_pid, captures, published, errors):
    limit = int(request.get("output_limit", 20000))
    published.clear()
    errors.clear()
    capture = _Capture(limit)
    captures.put(capture)
    saved = ()
    try:
        saved = os.dup(1), os.dup(2)
        os.dup2(capture.write_end, 1)
        os.dup2(capture.write_end, 2)
        result = shell.run_cell(request["code"], store_history=False)
    finally:
        if os.getpid() != worker_pid:  # a process the cell forked: it must not answer requests
            os._exit(0)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        for fd, original in zip((1, 2), saved, strict=False):  # saved is empty if dup failed
            os.dup2(original, fd)
            os.close(original)
        logs = capture.text()  # always, or the drain thread would wait on this pipe forever
    images = _figures()
    for data in published:
        if "image/png" in data:
            images.append(data["image/png"])
        elif "text/plain" in data:
            logs += data["text/plain"] + "\n"
    error = None
    failure = result.error_in_exec or result.error_before_exec
    if failure is not None:
        error = {"name": type(failure).__name__, "value": str(failure), "traceback": _clip(
            "\n".join(errors).encode(), limit)}
    value = None
    if result.result is not None:
        try:
            value = _clip(repr(result.result).encode(), limit)
        except Exception as exc:
            value = f"<repr failed: {type(exc).__name__}>"
    return {"ok": True, "logs": logs, "result": value, "error": error, "images": images}


def main():
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)

    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=config, colors="NoColor")
    shell.displayhook.write_output_prompt = lambda: None
    shell.displayhook.write_format_data = lambda *args, **kwargs: None
    published = []
    shell.display_pub.publish = lambda data, *args, **kwargs: published.append(data)
    errors = []
    shell._showtraceback = lambda etype, evalue, stb: errors.append(shell.InteractiveTB.stb2text(stb))
    worker_pid = os.getpid()
    captures = queue.Queue()
    threading.Thread(target=_drainer, args=(captures,), daemon=True).start()
    _write(proto_out, {"ready": True})

    while (request := _read(proto_in)) is not None:
        if request.get("preload"):
            for name in request["preload"]:
                try:
                    __import__(name)
                except Exception:  # a missing optional package only costs its warm start
                    pass
            _write(proto_out, {"ok": True})
            continue
        try:
            reply = _run_cell(shell, request, worker_pid, captures, published, errors)
        except Exception as exc:  # the worker itself must survive whatever the cell did to the process
            reply = {"ok": False, "logs": "", "result": None, "images": [],
                     "error": {"name": "SandboxError", "value": f"{type(exc).__name__}: {exc}", "traceback": ""}}
        _write(proto_out, reply)


main()
