"""Server behaviour that needs no real model: API keys, the queue, cancellation, error shapes."""

import json
import logging
import re
import threading
import time
from collections.abc import Sequence

import httpx
import numpy as np
import numpy.typing as npt
import openai
import pytest

from smolrun.backends.base import Pixels
from smolrun.engine import Engine
from smolrun.errors import SHUTTING_DOWN
from tests.fakes import ByteModel

BODY = {"model": "byte-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400}


class SlowModel(ByteModel):
    """Never ends on its own (EOS banned) and takes 20 ms a step, so requests overlap."""

    def __init__(self) -> None:
        super().__init__(seed=0)
        self.steps = 0
        self.prefilled_at = 0  # `steps` when the latest prefill ran
        self.started = threading.Event()

    def extend(self, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        self.started.set()
        self.steps += 1
        time.sleep(0.02)
        logits = super().extend(tokens)
        logits[256] = -np.inf
        return logits

    def prefill(self, tokens: Sequence[int], reuse: bool = True,
                pixels: Sequence[Pixels] = ()) -> npt.NDArray[np.float32]:
        self.prefilled_at = self.steps
        logits = super().prefill(tokens, reuse, pixels)
        logits[256] = -np.inf  # not as the first token either
        return logits


def test_api_key_is_required_when_set(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(ByteModel()), api_key="s3cret")
    base = server.url
    assert httpx.get(base.replace("/v1", "/health")).status_code == 200
    missing = httpx.get(f"{base}/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.get(f"{base}/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "Incorrect API key" in wrong.json()["error"]["message"]
    with openai.OpenAI(base_url=base, api_key="nope", max_retries=0) as wrong_key, \
            pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    assert [m.id for m in server.client().models.list()] == ["byte-model"]
    root = base.removesuffix("/v1")
    for path in ("/docs", "/redoc", "/openapi.json"):  # no route stays open under the key
        assert (path, httpx.get(root + path).status_code) == (path, 404)


def test_the_api_description_is_served_without_a_key(make_server) -> None:  # type: ignore[no-untyped-def]
    root = make_server(Engine(ByteModel())).url.removesuffix("/v1")
    assert [httpx.get(root + p).status_code for p in ("/docs", "/redoc", "/openapi.json")] == [200, 200, 200]


def test_the_playground_is_its_own_files_and_open_without_the_key(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(ByteModel()), api_key="k")
    root = server.url.removesuffix("/v1")
    page = httpx.get(root + "/")
    assert (page.status_code, page.headers["content-type"]) == (200, "text/html; charset=utf-8")
    assert '<script src="/playground/app.js" type="module">' in page.text
    for asset, kind in [("app.js", "text/javascript"), ("style.css", "text/css"), ("vendor/ajv2020.min.js",
                                                                                   "text/javascript")]:
        reply = httpx.get(f"{root}/playground/{asset}")
        assert (reply.status_code, reply.headers["content-type"]) == (200, f"{kind}; charset=utf-8")
    for outside in ("vendor/README.md", "../api/app.py", "%2e%2e/api/app.py", "nothing.js"):
        reply = httpx.get(f"{root}/playground/{outside}")
        assert (outside, reply.status_code, reply.json()["error"]["type"]) == (outside, 404, "invalid_request_error")
    assert httpx.get(f"{server.url}/models").status_code == 401  # the API itself keeps its key
    models = httpx.get(f"{server.url}/models", headers={"Authorization": "Bearer k"}).json()["data"]
    assert models[0]["capabilities"] == {"vision": False, "reasoning": False}


def test_full_queue_answers_429_and_nothing_accepted_is_lost(make_server) -> None:  # type: ignore[no-untyped-def]
    model = SlowModel()
    server = make_server(Engine(model), max_queue=1)
    results: list[int] = []

    def post() -> None:
        results.append(httpx.post(f"{server.url}/chat/completions", json={**BODY, "max_tokens": 60},
                                  timeout=60).status_code)

    running = threading.Thread(target=post)
    running.start()
    assert model.started.wait(10)
    waiting = threading.Thread(target=post)
    waiting.start()
    engine = server.engine
    deadline = time.monotonic() + 10
    while engine.waiting() < 1 and time.monotonic() < deadline:  # until it holds the one queue slot
        time.sleep(0.01)
    assert model.steps < 60, "the first request ended before the queue filled; the test proves nothing"
    rejected = httpx.post(f"{server.url}/chat/completions", json=BODY, timeout=60)
    assert rejected.status_code == 429
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    running.join()
    waiting.join()
    assert results == [200, 200]


@pytest.mark.parametrize("stream", [False, True])
def test_a_full_queue_is_429_before_any_byte_on_responses(make_server, stream: bool) -> None:  # type: ignore[no-untyped-def]
    model = SlowModel()
    server = make_server(Engine(model), max_queue=1)
    body = {"model": "byte-model", "input": "x", "max_output_tokens": 60}
    results: list[int] = []

    def post() -> None:
        results.append(httpx.post(f"{server.url}/responses", json=body, timeout=60).status_code)

    threads = [threading.Thread(target=post), threading.Thread(target=post)]
    threads[0].start()
    assert model.started.wait(10)
    threads[1].start()
    engine = server.engine
    deadline = time.monotonic() + 10
    while engine.waiting() < 1 and time.monotonic() < deadline:  # until it holds the one queue slot
        time.sleep(0.01)
    assert model.steps < 60, "the first request ended before the queue filled; the test proves nothing"
    with httpx.stream("POST", f"{server.url}/responses", json={**body, "stream": stream}, timeout=60) as rejected:
        status, payload = rejected.status_code, json.loads(rejected.read())
    assert (status, payload["error"]["type"]) == (429, "rate_limit_error")
    for thread in threads:
        thread.join()
    assert results == [200, 200]  # nothing accepted is lost


def _short(server, model: SlowModel) -> int:  # type: ignore[no-untyped-def]
    """The steps a 5-token request takes from its prefill. The model has one sequence: the request runs only
    once every earlier generation has stopped (a left one may still take a step after the client has gone, so
    the count starts at the request's own prefill)."""
    ok = httpx.post(f"{server.url}/chat/completions", json={**BODY, "max_tokens": 5}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
    return model.steps - model.prefilled_at


def test_a_client_that_disconnects_cancels_its_generation(make_server) -> None:  # type: ignore[no-untyped-def]
    model = SlowModel()
    server = make_server(Engine(model))
    alone = _short(server, model)
    with httpx.stream("POST", f"{server.url}/chat/completions", json={**BODY, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if '"content"' in line and model.steps > alone + 3:
                break
    assert _short(server, model) == alone  # it ran alone: the left generation had stopped
    assert model.steps - 2 * alone < 100  # and it stopped well before max_tokens=400


def test_non_streaming_disconnect_cancels_too(make_server) -> None:  # type: ignore[no-untyped-def]
    model = SlowModel()
    server = make_server(Engine(model))
    alone = _short(server, model)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/chat/completions", json=BODY, timeout=0.5)
    assert _short(server, model) == alone
    assert model.steps - 2 * alone < 100


LONG = {"chat/completions": BODY, "responses": {"model": "byte-model", "input": "hi", "max_output_tokens": 400}}


@pytest.mark.parametrize("route", ["chat/completions", "responses"])
def test_a_non_streamed_client_that_leaves_is_one_info_line(make_server, caplog, route: str) -> None:  # type: ignore[no-untyped-def]
    model = SlowModel()
    server = make_server(Engine(model))
    caplog.set_level(logging.INFO, logger="smolrun")
    uvicorn_errors = logging.getLogger("uvicorn.error")  # uvicorn's own handlers do not reach caplog's
    uvicorn_errors.addHandler(caplog.handler)
    try:
        alone = _short(server, model)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/{route}", json=LONG[route], timeout=0.5)
        assert _short(server, model) == alone  # the next request runs, alone: the left one had stopped
        assert model.steps - 2 * alone < 100  # well before its 400 tokens
        deadline = time.monotonic() + 10
        while len(caplog.records) < 4 and time.monotonic() < deadline:  # the cancellation, 3 request lines
            time.sleep(0.01)
    finally:
        uvicorn_errors.removeHandler(caplog.handler)
    lines = [(r.name, r.levelname, r.getMessage()) for r in caplog.records if r.name != "smolrun.requests"]
    prefix = "chatcmpl-" if route == "chat/completions" else "resp_"
    assert len(lines) == 1 and lines[0][:2] == ("smolrun", "INFO"), lines  # no ERROR, no traceback
    found = re.fullmatch(f"request ({prefix}[0-9a-f]{{32}}) cancelled: the client disconnected", lines[0][2])
    assert found is not None
    requests = [r.getMessage() for r in caplog.records if r.name == "smolrun.requests"]
    assert len(requests) == 3 and sum(f"id={found[1]} " in line for line in requests) == 1
    assert [line.rsplit(" ", 1)[1] for line in requests if f"id={found[1]} " in line] == ["status=499"]


def test_a_responses_client_that_leaves_its_stream_cancels_its_generation(make_server) -> None:  # type: ignore[no-untyped-def]
    model = SlowModel()
    server = make_server(Engine(model))
    alone = _short(server, model)
    with httpx.stream("POST", f"{server.url}/responses", json={**LONG["responses"], "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if "response.output_text.delta" in line and model.steps > alone + 3:
                break
    assert _short(server, model) == alone
    assert model.steps - 2 * alone < 100


def test_closing_the_engine_answers_its_live_and_queued_requests_503(make_server) -> None:  # type: ignore[no-untyped-def]
    model = SlowModel()
    engine = Engine(model)
    server = make_server(engine)
    alone = _short(server, model)
    model.started.clear()
    answers: dict[str, tuple[int, object]] = {}

    def post(name: str) -> None:
        reply = httpx.post(f"{server.url}/chat/completions", json=BODY, timeout=60)
        answers[name] = (reply.status_code, reply.json())

    live = threading.Thread(target=post, args=("live",))
    live.start()
    assert model.started.wait(10)
    queued = threading.Thread(target=post, args=("queued",))
    queued.start()
    deadline = time.monotonic() + 10
    while engine.waiting() < 1 and time.monotonic() < deadline:  # until it waits behind the live one
        time.sleep(0.01)
    assert engine.waiting() == 1
    engine.close()
    live.join(30)
    queued.join(30)
    error = {"error": {"message": SHUTTING_DOWN, "type": "server_error", "param": None, "code": None}}
    assert answers == {"live": (503, error), "queued": (503, error)}
    assert model.steps < 400  # the live one was cut short
    assert _short(server, model) == alone  # a later request starts a new runner and is served


def test_unknown_route_and_bad_json_use_openai_error_shape(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(ByteModel()))
    r = httpx.get(f"{server.url}/nothing-here")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{server.url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_context_overflow_is_a_400(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(ByteModel(n_ctx=64)))
    r = httpx.post(f"{server.url}/chat/completions",
                   json={**BODY, "messages": [{"role": "user", "content": "x" * 200}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


class BrokenModel(ByteModel):
    """A model whose every prefill fails with a bug (not a smolrun error)."""

    def prefill(self, tokens: Sequence[int], reuse: bool = True,
                pixels: Sequence[Pixels] = ()) -> npt.NDArray[np.float32]:
        raise RuntimeError("a bug")


def test_a_500_keeps_the_connection_for_the_next_request(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(BrokenModel()))
    with httpx.Client(timeout=30) as client:
        failed = client.post(f"{server.url}/chat/completions", json=BODY)
        assert (failed.status_code, failed.json()) == (500, {"error": {
            "message": "internal error: RuntimeError", "type": "server_error", "param": None, "code": None}})
        assert failed.headers.get("connection") != "close"
        assert client.get(f"{server.url}/models").status_code == 200  # on the same keep-alive connection
        pool = client._transport._pool  # type: ignore[attr-defined]
        assert len(pool.connections) == 1
