"""A web page beside the server cannot drive it: the Host check, the Origin check and CORS, on a real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from smolrun.api.browser import BrowserPolicy, host_name, same_origin
from smolrun.engine import Engine
from tests.conftest import Server
from tests.fakes import TurnsModel

EVIL = "http://evil.example"


@pytest.mark.parametrize(("value", "name"), [
    ("localhost", "localhost"), ("LocalHost:8000", "localhost"), ("localhost.:80", "localhost"),
    ("127.0.0.1:8000", "127.0.0.1"), ("[::1]:8000", "[::1]"), ("[::1]", "[::1]"), ("::1", "[::1]"),
    ("0:0:0:0:0:0:0:1", "[::1]"), ("attacker.example:8000", "attacker.example"),
    ("[::1]x", None), ("[::1", None), ("host:port", None), ("a b", None), ("user@host", None), (":80", None),
    ("1:2:3", None),
])
def test_host_names_are_compared_without_port_case_or_final_dot(value: str, name: str | None) -> None:
    assert host_name(value) == name


def test_policy_by_bind_address() -> None:
    loopback = {"localhost", "127.0.0.1", "[::1]"}
    assert BrowserPolicy.build("127.0.0.1", (), ()).hosts == loopback
    assert BrowserPolicy.build("::1", ("Box.lan:8000",), ()).hosts == loopback | {"box.lan"}
    assert BrowserPolicy.build("localhost", ("*",), ()).hosts is None
    assert BrowserPolicy.build("0.0.0.0", (), ()).hosts is None  # open: the CLI warns without a key
    assert BrowserPolicy.build("192.168.1.5", ("box.lan",), ()).hosts == loopback | {"box.lan"}
    assert BrowserPolicy.build("127.0.0.1", (), ("HTTP://Notebook:8888/",)).origins == {"http://notebook:8888"}


def test_same_origin_is_the_request_host_and_port() -> None:
    assert same_origin("http://127.0.0.1:8000", "127.0.0.1:8000")
    assert same_origin("https://box.lan", "box.lan")  # TLS ended by a proxy in front
    assert not same_origin("http://127.0.0.1:8001", "127.0.0.1:8000")
    assert not same_origin("null", "127.0.0.1:8000")
    assert not same_origin("http://127.0.0.1:8000", None)


def _start(make_server: Any, **settings: object) -> Server:
    server: Server = make_server(Engine(TurnsModel(b"ok")), **settings)
    return server


def _port(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1].split("/")[0])


def _error(reply: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = reply.json()["error"]
    return body


def test_a_foreign_host_is_403_and_each_loopback_form_is_served(make_server: Any) -> None:
    server = _start(make_server)
    port = _port(server)
    refused = httpx.get(f"{server.url}/models", headers={"Host": f"attacker.example:{port}"})
    assert refused.status_code == 403
    error = _error(refused)
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "host_not_allowed", None)
    assert error["message"] == (f"the Host header 'attacker.example:{port}' is not one this server answers (DNS "
                                "rebinding). Start smolrun with --allowed-hosts NAME to allow it, or "
                                "--allowed-hosts '*' to turn the check off")
    assert httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": "attacker.example"}).status_code == 403
    for host in ("localhost", f"localhost:{port}", "127.0.0.1", f"127.0.0.1:{port}", f"[::1]:{port}",
                 "LOCALHOST:1", "localhost."):
        reply = httpx.get(f"{server.url}/models", headers={"Host": host})
        assert (host, reply.status_code, reply.json()["data"][0]["id"]) == (host, 200, "byte-model")


def test_allowed_hosts_add_names_and_star_turns_the_check_off(make_server: Any) -> None:
    named = _start(make_server, allowed_hosts=("box.lan",))
    assert httpx.get(f"{named.url}/models", headers={"Host": "box.lan:9"}).status_code == 200
    assert httpx.get(f"{named.url}/models", headers={"Host": "localhost"}).status_code == 200
    assert httpx.get(f"{named.url}/models", headers={"Host": "other.lan"}).status_code == 403
    anything = _start(make_server, allowed_hosts=("*",))
    assert httpx.get(f"{anything.url}/models", headers={"Host": "other.lan"}).status_code == 200


def _upload(server: Server, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{server.url}/files", headers=headers, data={"purpose": "user_data"},
                      files={"file": ("notes.txt", b"planted by a web page", "text/plain")})


def _blobs(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "files").rglob("*") if p.is_file()] if (data_dir / "files").exists() else []


@pytest.mark.parametrize("headers", [{"Origin": EVIL}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                                     {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}],
                         ids=["origin", "null-origin", "fetch-site", "both"])
def test_a_cross_site_upload_is_403_and_writes_nothing(make_server: Any, headers: dict[str, str]) -> None:
    server = _start(make_server)
    reply = _upload(server, headers)
    assert (reply.status_code, _error(reply)["code"]) == (403, "origin_not_allowed")
    assert _blobs(server.settings.data_dir) == []
    assert httpx.get(f"{server.url}/files").json()["data"] == []
    # The same upload from curl or an SDK (neither header) is stored.
    assert _upload(server, {}).status_code == 200
    assert len(_blobs(server.settings.data_dir)) == 1


def test_the_refusal_says_which_flag_allows_an_origin(make_server: Any) -> None:
    server = _start(make_server)
    reply = httpx.get(f"{server.url}/models", headers={"Origin": EVIL})
    assert _error(reply)["message"] == (f"the origin '{EVIL}' is not allowed. Start smolrun with --allowed-origins "
                                        f"{EVIL} to allow it")


def test_the_servers_own_origin_and_a_cross_site_page_load_pass(make_server: Any) -> None:
    server = _start(make_server)
    own = f"http://127.0.0.1:{_port(server)}"
    reply = httpx.get(f"{server.url}/models", headers={"Origin": own, "Sec-Fetch-Site": "same-origin"})
    assert (reply.status_code, reply.headers.get("access-control-allow-origin")) == (200, None)
    page = httpx.get(f"{own}/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert page.status_code == 200  # a link to the playground from another site; that site cannot read it
    fetched = httpx.get(f"{own}/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"})
    assert fetched.status_code == 403


def test_an_allowed_origin_gets_cors(make_server: Any) -> None:
    app_origin = "http://localhost:3000"
    server = _start(make_server, allowed_origins=(app_origin,))
    preflight = httpx.options(f"{server.url}/chat/completions", headers={
        "Origin": app_origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os"})
    assert preflight.status_code == 204
    assert {k: preflight.headers[k] for k in ("access-control-allow-origin", "access-control-allow-methods",
                                              "access-control-allow-headers", "access-control-max-age", "vary")} == {
        "access-control-allow-origin": app_origin, "access-control-allow-methods": "GET, POST, DELETE, OPTIONS",
        "access-control-allow-headers": "authorization,content-type,x-stainless-os",
        "access-control-max-age": "600", "vary": "Origin"}
    reply = httpx.post(f"{server.url}/chat/completions", headers={"Origin": app_origin, "Sec-Fetch-Site": "same-site"},
                       json={"model": "byte-model", "messages": [{"role": "user", "content": "hi"}]})
    assert (reply.status_code, reply.json()["choices"][0]["message"]["content"]) == (200, "ok")
    assert (reply.headers["access-control-allow-origin"], reply.headers["vary"]) == (app_origin, "Origin")
    other = httpx.options(f"{server.url}/chat/completions", headers={
        "Origin": EVIL, "Access-Control-Request-Method": "POST"})
    assert (other.status_code, other.headers.get("access-control-allow-origin")) == (403, None)


def test_star_allows_every_origin(make_server: Any) -> None:
    server = _start(make_server, allowed_origins=("*",))
    reply = httpx.get(f"{server.url}/models", headers={"Origin": EVIL, "Sec-Fetch-Site": "cross-site"})
    assert (reply.status_code, reply.headers["access-control-allow-origin"]) == (200, EVIL)


def test_the_sdk_sends_neither_header_and_is_unaffected(make_server: Any) -> None:
    server = _start(make_server)
    reply = server.client().chat.completions.create(model="byte-model",
                                                    messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "ok"
