# mypy: ignore-errors
# (runs inside the sandbox, under its own interpreter, with IPython objects that have no stubs)
"""Runs inside the sandbox, as the supervisor's child: one persistent IPython shell, one request per cell.

Only the standard library and IPython are needed; the supervisor starts this file's source with `python -c`,
so nothing of the host's tree has to be mounted. The protocol (length-prefixed JSON) runs over the two
descriptors named in argv; stdout and stderr are a pipe the supervisor reads itself, so the logs are never
part of this process's reply. User code can reach everything this process holds, so the supervisor checks
every reply (see supervisor.py); this file only has to be correct, not trusted.
"""

import base64
import io
import json
import os
import signal
import struct
import sys

ALIASES = {"numpy": "np", "pandas": "pd", "matplotlib.pyplot": "plt"}  # bound in the cell namespace when preloaded
MAX_IMAGES = 32  # per call, as the supervisor accepts them
MAX_IMAGE_BYTES = 16 * 1024 * 1024

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


def _clip(text, limit):
    """At most `limit` bytes of `text`: its head and tail, saying how much was left out between them."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return text
    half = limit // 2
    return (f"{data[:half].decode('utf-8', errors='replace')}\n[... {len(data) - 2 * half} bytes of output "
            f"truncated ...]\n{data[-half:].decode('utf-8', errors='replace')}")


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


def _run_cell(shell, request, worker_pid, published, errors):
    limit = int(request.get("output_limit", 20000))
    published.clear()
    errors.clear()
    crash = None
    try:
        result = shell.run_cell(request["code"], store_history=False)
    except Exception as exc:  # IPython itself broke under what the cell did (threads or memory used up)
        result = None
        crash = exc
        while crash.__context__ is not None:  # the first failure, not what it broke in IPython afterwards
            crash = crash.__context__
    finally:
        if os.getpid() != worker_pid:  # a process the cell forked: it must not answer requests
            os._exit(0)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()  # before the reply, so the supervisor has every byte of the cell's output
            except Exception:
                pass
    images = _figures()
    text = []
    for data in published:
        if "image/png" in data:
            images.append(data["image/png"])
        elif "text/plain" in data:
            text.append(data["text/plain"] + "\n")
    error = None
    failure = crash if result is None else (result.error_in_exec or result.error_before_exec)
    if failure is not None:
        error = {"name": type(failure).__name__, "value": _clip(str(failure), limit),
                 "traceback": _clip("\n".join(errors), limit)}
    value = None
    if result is not None and result.result is not None:
        try:
            value = _clip(repr(result.result), limit)
        except Exception as exc:
            value = f"<repr failed: {type(exc).__name__}>"
    return {"result": value, "error": error, "images": _bounded(images), "text": _clip("".join(text), limit)}


def _bounded(images):
    """The PNG images that fit the supervisor's budget, in order; the rest are dropped."""
    kept, total = [], 0
    for image in images:
        try:
            png = base64.b64decode(image, validate=True)
        except Exception:
            continue
        if len(kept) == MAX_IMAGES or total + len(png) > MAX_IMAGE_BYTES or not png.startswith(b"\x89PNG\r\n\x1a\n"):
            continue
        kept.append(image)
        total += len(png)
    return kept


def main():
    # A timeout is a SIGINT, which must raise KeyboardInterrupt in the cell: Python leaves SIGINT ignored when it
    # starts ignored, as it does under a server launched from a background shell job.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    proto_in = os.fdopen(int(sys.argv[1]), "rb", buffering=0)
    proto_out = os.fdopen(int(sys.argv[2]), "wb", buffering=0)

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
    _write(proto_out, {"seq": None})

    while (request := _read(proto_in)) is not None:
        if request.get("preload"):
            for name in request["preload"]:
                try:
                    __import__(name)
                except Exception:  # a missing optional package only costs its warm start
                    continue
                if name in ALIASES:  # small models often use np, pd or plt without importing them
                    shell.user_ns[ALIASES[name]] = sys.modules[name]
            _write(proto_out, {"seq": request.get("seq")})
            continue
        try:
            reply = _run_cell(shell, request, worker_pid, published, errors)
        except Exception as exc:  # the worker itself must survive whatever the cell did to the process
            reply = {"error": {"name": "SandboxError", "value": f"{type(exc).__name__}: {exc}", "traceback": ""}}
        _write(proto_out, {**reply, "seq": request.get("seq")})


main()
