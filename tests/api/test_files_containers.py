"""Files and Containers APIs through the openai SDK, and smolrun's direct execution endpoint."""

from __future__ import annotations

import httpx
import openai
import pytest

from smolrun.engine import Engine
from smolrun.sandbox import default_config, unavailable_reason
from tests.fakes import ByteModel, TurnsModel

needs_sandbox = pytest.mark.skipif(unavailable_reason(default_config()) is not None,
                                   reason=f"no sandbox here: {unavailable_reason(default_config())} "
                                          "(`make test` installs it)")
CSV = b"city,population\nParis,2100000\nLyon,520000\n"


@pytest.fixture()
def api(make_server):  # type: ignore[no-untyped-def]
    return make_server(Engine(ByteModel()), max_file_mb=1)


def test_files_api_round_trip(api) -> None:  # type: ignore[no-untyped-def]
    client = api.client()
    empty = httpx.get(f"{client.base_url}files").json()
    # OpenAI's spec types first_id and last_id as required strings: never null, even on an empty page.
    assert empty == {"object": "list", "data": [], "first_id": "", "last_id": "", "has_more": False}
    created = client.files.create(file=("cities.csv", CSV), purpose="user_data")
    assert created.filename == "cities.csv" and created.bytes == len(CSV) and created.id.startswith("file-")
    assert [f.id for f in client.files.list()] == [created.id]
    assert client.files.retrieve(created.id).purpose == "user_data"
    assert client.files.content(created.id).read() == CSV
    assert client.files.delete(created.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)


def test_files_api_refuses_bad_uploads(api) -> None:  # type: ignore[no-untyped-def]
    client = api.client()
    with pytest.raises(openai.APIStatusError) as err:
        client.files.create(file=("big.bin", b"x" * (1024 * 1024 + 1)), purpose="user_data")
    assert err.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("a.txt", b"a"), purpose="nonsense")  # type: ignore[arg-type]


@needs_sandbox
def test_containers_files_and_exec_round_trip(api) -> None:  # type: ignore[no-untyped-def]
    client = api.client()
    upload = client.files.create(file=("cities.csv", CSV), purpose="user_data")
    container = client.containers.create(name="analysis", file_ids=[upload.id])
    assert container.status == "active" and container.expires_after and container.expires_after.minutes == 20
    assert [c.id for c in client.containers.list()] == [container.id]
    files = list(client.containers.files.list(container.id))
    assert [(f.path, f.source) for f in files] == [("/mnt/data/cities.csv", "user")]
    client.containers.files.create(container.id, file=("notes.txt", b"hello"))

    code = ("import pandas as pd\ndf = pd.read_csv('/mnt/data/cities.csv')\n"
            "df.assign(share=df.population / df.population.sum()).to_csv('/mnt/data/report.csv', index=False)\n"
            "total = int(df.population.sum())\ntotal")
    run = httpx.post(f"{api.url}/containers/{container.id}/exec", json={"code": code}, timeout=60).json()
    assert run["error"] is None and run["result"] == "2620000"
    assert [f["path"] for f in run["files"]] == ["/mnt/data/report.csv"] and run["files"][0]["id"].startswith("cfile_")
    again = httpx.post(f"{api.url}/containers/{container.id}/exec", json={"code": "total * 2"}, timeout=60).json()
    assert again["result"] == "5240000"  # state persists

    report = client.containers.files.retrieve(run["files"][0]["id"], container_id=container.id)
    assert report.source == "assistant"
    body = client.containers.files.content.retrieve(report.id, container_id=container.id).read()
    expected = httpx.post(f"{api.url}/containers/{container.id}/exec",
                          json={"code": "open('/mnt/data/report.csv', 'rb').read()"}, timeout=60).json()["result"]
    assert repr(body) == expected

    client.containers.files.delete(report.id, container_id=container.id)
    assert {f.path for f in client.containers.files.list(container.id)} == {"/mnt/data/cities.csv",
                                                                            "/mnt/data/notes.txt"}
    client.containers.delete(container.id)
    with pytest.raises(openai.NotFoundError):
        client.containers.retrieve(container.id)


@needs_sandbox
def test_planted_links_and_fifos_are_refused_by_downloads(api) -> None:  # type: ignore[no-untyped-def]
    client = api.client()
    container = client.containers.create(name="hostile")
    httpx.post(f"{api.url}/containers/{container.id}/exec", timeout=60,
               json={"code": "import os\nos.symlink('/etc/shadow', '/mnt/data/leak.txt')\n"
                             "os.mkfifo('/mnt/data/p.csv')"})
    listed = {f.path: f.id for f in client.containers.files.list(container.id)}
    assert listed == {}  # neither a link nor a FIFO is a file the host will serve
    client.containers.delete(container.id)


@needs_sandbox
def test_exec_timeout_and_tracebacks_are_results(api) -> None:  # type: ignore[no-untyped-def]
    container = api.client().containers.create(name="t")
    url = f"{api.url}/containers/{container.id}/exec"
    failed = httpx.post(url, json={"code": "1/0"}, timeout=60).json()
    assert failed["error"]["name"] == "ZeroDivisionError"
    slow = httpx.post(url, json={"code": "while True: pass", "timeout": 1}, timeout=60).json()
    assert slow["timed_out"] and not slow["state_lost"]


@needs_sandbox
def test_idle_containers_expire_and_then_refuse_use(api) -> None:  # type: ignore[no-untyped-def]
    client = api.client()
    container = client.containers.create(name="short", expires_after={"anchor": "last_active_at", "minutes": 1})
    manager = api.app.state.smolrun.containers
    import time

    assert manager.reap(now=time.time() + 120) == [container.id]
    assert client.containers.retrieve(container.id).status == "expired"
    with pytest.raises(openai.BadRequestError, match="expired"):
        client.containers.files.list(container.id).data  # noqa: B018


def test_no_sandbox_is_a_clear_503(make_server, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SMOLRUN_SANDBOX_PYTHON", "/nonexistent/python")
    server = make_server(Engine(ByteModel()))
    with pytest.raises(openai.InternalServerError) as err:
        server.client().containers.create(name="x")
    assert err.value.status_code == 503 and "sandbox Python environment" in str(err.value)


ATTACKS = {
    "fork bomb": "import os\nwhile True:\n    try: os.fork()\n    except OSError: break",
    "memory bomb": "hog = []\nwhile True: hog.append(bytearray(64 * 1024 * 1024))",
    "infinite loop": "while True: pass",
    "kill the parent": "import os, signal\nfor pid in (1, os.getppid()):\n    try: os.kill(pid, signal.SIGKILL)\n"
                       "    except OSError: pass",
    "suicide": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "huge output": "import os\nfor _ in range(5000): os.write(1, b'x' * 4096)",
    "network": "import socket\nsocket.create_connection(('127.0.0.1', 80), timeout=1)",
}


@needs_sandbox
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attacks_through_the_api_leave_the_server_healthy(api, attack: str) -> None:  # type: ignore[no-untyped-def]
    client = api.client()
    container = client.containers.create(name=attack)
    url = f"{api.url}/containers/{container.id}/exec"
    reply = httpx.post(url, json={"code": ATTACKS[attack], "timeout": 3}, timeout=60)
    assert reply.status_code == 200  # an attack is a result, never a server error
    assert httpx.get(api.url.replace("/v1", "/health")).status_code == 200
    assert httpx.post(url, json={"code": "1 + 1"}, timeout=60).json()["result"] == "2"
    assert [m.id for m in client.models.list()] == ["byte-model"]
    client.containers.delete(container.id)


@needs_sandbox
def test_exec_cli_in_a_server_container_keeps_state(api) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from smolrun.cli import main

    container = api.client().containers.create(name="cli")
    server = api.url.removesuffix("/v1")
    runner = CliRunner()
    first = runner.invoke(main, ["exec", "-", "--container", container.id, "--server", server], input="y = 5")
    assert first.exit_code == 0, first.output
    second = runner.invoke(main, ["exec", "-", "--container", container.id, "--server", server], input="y * 3")
    assert second.exit_code == 0 and second.output.strip() == "15"
    missing = runner.invoke(main, ["exec", "-", "--container", "cntr_nope", "--server", server], input="1")
    assert missing.exit_code == 2 and "No container found" in missing.output


@needs_sandbox
def test_an_upload_onto_a_planted_fifo_is_a_400_and_blocks_nothing(api) -> None:  # type: ignore[no-untyped-def]
    client = api.client()
    container = client.containers.create(name="fifo")
    url = f"{api.url}/containers/{container.id}/exec"
    httpx.post(url, json={"code": "import os\nos.mkfifo('/mnt/data/f.csv')"}, timeout=60)
    for _ in range(8):  # more than the threads of any pool: none of them may hang
        with pytest.raises(openai.BadRequestError) as err:
            client.containers.files.create(container.id, file=("f.csv", CSV))
        assert err.value.body["message"] == ("/mnt/data/f.csv already exists and is a FIFO, not a regular file: "  # type: ignore[index]
                                             "delete it first")
    assert httpx.post(url, json={"code": "1 + 1"}, timeout=60).json()["result"] == "2"
    client.containers.delete(container.id)


@needs_sandbox
@pytest.mark.parametrize(("name", "message"), [(".", "give the file a printable name"),
                                                ("x" * 300, "the file name is 300 bytes long; the limit is 255")])
def test_uploads_with_impossible_names_are_a_400(api, name: str, message: str) -> None:  # type: ignore[no-untyped-def]
    client = api.client()
    container = client.containers.create(name="names")
    with pytest.raises(openai.BadRequestError, match=message):
        client.containers.files.create(container.id, file=(name, CSV))
    client.containers.delete(container.id)


@needs_sandbox
def test_undecodable_names_and_paths_past_path_max_are_listed_and_served(api) -> None:  # type: ignore[no-untyped-def]
    client = api.client()
    container = client.containers.create(name="names")
    url = f"{api.url}/containers/{container.id}/exec"
    code = ("import os\nfor i in range(20):\n    os.mkdir('d' * 250)\n    os.chdir('d' * 250)\n"
            "open('deep.txt', 'w').write('bottom')\nos.chdir('/mnt/data')\nopen(b'\\xff\\xfe.bin', 'wb').write(b'raw')")
    made = httpx.post(url, json={"code": code}, timeout=60).json()
    deep = "/mnt/data/" + "/".join(["d" * 250] * 20) + "/deep.txt"
    assert made["error"] is None and {f["path"] for f in made["files"]} == {deep, "/mnt/data/\\xff\\xfe.bin"}
    assert httpx.post(url, json={"code": "1 + 1"}, timeout=60).json()["result"] == "2"
    listed = {f.path: f.id for f in client.containers.files.list(container.id)}
    assert set(listed) == {deep, "/mnt/data/\\xff\\xfe.bin"}
    assert client.containers.files.content.retrieve(listed[deep], container_id=container.id).read() == b"bottom"
    odd = client.containers.files.content.retrieve(listed["/mnt/data/\\xff\\xfe.bin"], container_id=container.id)
    assert odd.read() == b"raw"
    client.containers.files.delete(listed["/mnt/data/\\xff\\xfe.bin"], container_id=container.id)
    assert {f.path for f in client.containers.files.list(container.id)} == {deep}
    client.containers.delete(container.id)


@needs_sandbox
def test_calls_to_a_busy_container_wait_without_holding_threads(api, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import threading

    container = api.client().containers.create(name="busy")
    url = f"{api.url}/containers/{container.id}/exec"
    manager = api.app.state.smolrun.containers
    inside, peak, lock = 0, 0, threading.Lock()
    execute = manager.execute

    def counted(*args):  # type: ignore[no-untyped-def]
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        try:
            return execute(*args)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(manager, "execute", counted)

    async def calls() -> list[object]:
        async with httpx.AsyncClient(timeout=60) as http:
            replies = await asyncio.gather(*(http.post(url, json={"code": f"import time\ntime.sleep(0.1)\n{i}"})
                                             for i in range(6)))
        return sorted(r.json()["result"] for r in replies)

    assert asyncio.run(calls()) == ["0", "1", "2", "3", "4", "5"]
    assert peak == 1  # the other five waited on the event loop, not on sandbox threads


@pytest.mark.parametrize(("name", "header"), [
    ("日本.txt", "attachment; filename=\"__.txt\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC.txt"),
    ('say "hi".txt', "attachment; filename=\"say _hi_.txt\"; filename*=UTF-8''say%20%22hi%22.txt"),
    ("a\x00b.txt", "attachment; filename=\"a_b.txt\"; filename*=UTF-8''a%00b.txt"),
])
def test_any_file_name_downloads_with_an_rfc_6266_header(make_server, name: str, header: str) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(TurnsModel(b"ok")))
    # By hand: httpx would percent-encode the quote and the NUL in the name, as browsers do.
    body = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nassistants\r\n--b\r\n'
            b'Content-Disposition: form-data; name="file"; filename="' + name.replace('"', '\\"').encode() +
            b'"\r\nContent-Type: text/plain\r\n\r\ndata\r\n--b--\r\n')
    uploaded = httpx.post(f"{server.url}/files", content=body, timeout=30,
                          headers={"content-type": "multipart/form-data; boundary=b"})
    assert uploaded.status_code == 200, uploaded.text
    reply = httpx.get(f"{server.url}/files/{uploaded.json()['id']}/content", timeout=30)
    assert (reply.status_code, reply.content, reply.headers["content-disposition"]) == (200, b"data", header)


def test_file_objects_carry_no_null_the_spec_forbids(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(TurnsModel(b"ok")))
    made = httpx.post(f"{server.url}/files", files={"file": ("a.txt", b"x")}, data={"purpose": "assistants"},
                      timeout=30).json()
    assert set(made) == {"id", "object", "bytes", "created_at", "filename", "purpose", "status"}
    assert server.client().files.retrieve(made["id"]).expires_at is None  # the SDK reads it as absent
