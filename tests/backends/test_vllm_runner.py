"""The vLLM runner's own bookkeeping against a scripted upstream (httpx's MockTransport: no vLLM needed): a sink
that raises ends its own request only, and close() ends every request in flight or waiting for a place."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import types
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from smolrun.backends.decode import SequenceState
from smolrun.backends.vllm import RemoteJob, Replicas, VllmRunner
from smolrun.errors import SHUTTING_DOWN, ServerShuttingDown
from smolrun.turn import SamplingParams, TextDelta

SHORT, LONG = [1], [2]  # prompts: "hi" then stop; one token, then nothing for 30 s unless closed first


def _data(tokens: list[int], finish: str | None = None) -> bytes:
    return f"data: {json.dumps({'choices': [{'token_ids': tokens, 'finish_reason': finish}]})}\n\n".encode()


class Upstream:
    """A scripted vLLM /v1/completions that notes every stream closed before its end (vLLM aborts those)."""

    def __init__(self) -> None:
        self.closed: list[list[int]] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["prompt"]

        async def stream() -> AsyncIterator[bytes]:
            if prompt == SHORT:
                yield _data([104, 105])
                yield _data([], "stop")
                yield b"data: [DONE]\n\n"
                return
            try:
                yield _data([120])
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.closed.append(prompt)
                raise

        return httpx.Response(200, content=stream())


def _runner(upstream: Upstream, max_inflight: int = 4) -> VllmRunner:
    model = types.SimpleNamespace(replicas=Replicas(["http://upstream"]))
    runner = VllmRunner(model, max_queue=4, max_inflight=max_inflight)  # type: ignore[arg-type]
    asyncio.run_coroutine_threadsafe(runner._client.aclose(), runner._loop).result(10)
    runner._client = httpx.AsyncClient(transport=httpx.MockTransport(upstream.handle))
    return runner


def _job(prompt: list[int], sink: Callable[[object], None]) -> RemoteJob:
    state = SequenceState(len(prompt), 64, SamplingParams(max_tokens=20), None, frozenset({256}),
                          lambda t: bytes([t]))
    return RemoteJob({"prompt": prompt}, state, sink, lambda: False)


class _Heard:
    """A sink that keeps what it hears: event kinds and texts, errors as (type, message)."""

    def __init__(self) -> None:
        self.items: list[object] = []
        self.ended = threading.Event()

    def __call__(self, item: object) -> None:
        if isinstance(item, BaseException):
            self.items.append((type(item).__name__, str(item)))
        elif item is None:
            self.items.append(None)
            self.ended.set()
        else:
            self.items.append([e.text if isinstance(e, TextDelta) else type(e).__name__ for e in item])  # type: ignore[attr-defined]


def _until(done: Callable[[], bool], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.001)
    return done()


def test_a_sink_that_raises_ends_its_own_request_only(caplog: pytest.LogCaptureFixture) -> None:
    upstream = Upstream()
    runner = _runner(upstream)
    calls: list[object] = []

    def failing(item: object) -> None:
        calls.append(item)
        raise RuntimeError("the client's event loop is closed")

    other = _Heard()
    runner.enqueue(_job(LONG, failing))
    runner.enqueue(_job(SHORT, other))
    assert other.ended.wait(10)
    assert _until(lambda: upstream.closed == [LONG] and runner.waiting() == 0 and runner._admitted == 0)
    runner.close()
    assert len(calls) == 1  # its first events; then nothing (no error, no end), and its upstream request closed
    errors = [(r.getMessage(), repr(r.exc_info[1]) if r.exc_info else "") for r in caplog.records
              if r.levelno >= logging.ERROR]
    assert errors == [("a request's event sink failed: the request is dropped",
                       "RuntimeError(\"the client's event loop is closed\")")]
    assert other.items == [["h", "i"], [], ["Done"], None]


def test_close_ends_the_request_in_flight_and_the_one_waiting() -> None:
    upstream = Upstream()
    runner = _runner(upstream, max_inflight=1)
    live, waiting = _Heard(), _Heard()
    runner.enqueue(_job(LONG, live))
    assert _until(lambda: bool(live.items))  # in flight: the only place is taken
    runner.enqueue(_job(LONG, waiting))
    assert runner.waiting() == 1
    runner.close()
    assert not runner._thread.is_alive()
    error = ("ServerShuttingDown", SHUTTING_DOWN)
    assert (live.items, waiting.items, upstream.closed) == ([["x"], error, None], [error, None], [LONG])
    with pytest.raises(ServerShuttingDown):
        runner.enqueue(_job(SHORT, _Heard()))
