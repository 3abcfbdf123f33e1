"""EventStream: what a runner's thread hands to the event loop. Deltas within the stream interval of the last
hand-over wait for the next one and arrive merged; the first events, the end and errors go at once."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from smolrun.engine import Engine
from smolrun.errors import ServerShuttingDown
from smolrun.scheduler import EventStream, merged
from smolrun.turn import DecodeStats, Done, Event, ReasoningDelta, TextDelta, TokenLogprob
from tests.fakes import ByteModel

DONE = Done("stop", DecodeStats(3, 5, 0, 5, 0.0, 0.0))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def drain(stream: EventStream) -> list[Event]:
    out = []
    async for event in stream:
        out.append(event)
        if isinstance(event, Done):
            break
    return out


def test_deltas_within_the_interval_wait_and_arrive_merged() -> None:
    async def test() -> list[Event]:
        clock = Clock()
        stream = EventStream(interval=0.02, clock=clock)
        stream.sink([TextDelta("a", (1,))])  # the first: at once
        for text, token in (("b", 2), ("c", 3)):
            clock.now += 0.008
            stream.sink([TextDelta(text, (token,))])  # 8 and 16 ms after it: held
        clock.now += 0.008
        stream.sink([TextDelta("d", (4,))])  # 24 ms: handed over with what was held
        clock.now += 0.001
        stream.sink([TextDelta("e", (5,)), DONE])  # the end goes at once
        return await drain(stream)

    assert asyncio.run(test()) == [TextDelta("a", (1,)), TextDelta("bcd", (2, 3, 4)), TextDelta("e", (5,)), DONE]


def test_an_error_or_the_end_hands_over_what_is_held_first() -> None:
    async def test() -> list[object]:
        clock = Clock()
        stream = EventStream(interval=1.0, clock=clock)
        stream.sink([TextDelta("a")])
        stream.sink([TextDelta("b")])
        stream.sink(ServerShuttingDown("closing"))
        got: list[object] = []
        try:
            async for event in stream:
                got.append(event)
        except ServerShuttingDown as exc:
            got.append(exc.message)
        return got

    assert asyncio.run(test()) == [TextDelta("a"), TextDelta("b"), "closing"]


def test_no_interval_hands_over_every_delta() -> None:
    async def test() -> list[Event]:
        stream = EventStream()
        for text in "abc":
            stream.sink([TextDelta(text)])
        stream.sink([DONE])
        return await drain(stream)

    assert asyncio.run(test()) == [TextDelta("a"), TextDelta("b"), TextDelta("c"), DONE]


def test_merging_keeps_branches_thoughts_and_logprobs_apart_and_in_order() -> None:
    lp = [TokenLogprob(t, -0.5, ()) for t in range(4)]
    events: list[Event] = [ReasoningDelta("x"), ReasoningDelta("y"), TextDelta("a", (0,), "text", (lp[0],)),
                           TextDelta("b", (1,), "text", (lp[1],)), TextDelta("<", (2,), "calls", (lp[2],)),
                           TextDelta("{", (3,), "calls", (lp[3],)), DONE]
    assert merged(events) == [ReasoningDelta("xy"), TextDelta("ab", (0, 1), "text", (lp[0], lp[1])),
                              TextDelta("<{", (2, 3), "calls", (lp[2], lp[3])), DONE]


@pytest.mark.parametrize(("interval_ms", "chunks"), [(0, list("hello world")), (60_000, ["h", "ello world"])])
def test_a_streamed_chat_sends_a_chunk_per_interval(make_server, interval_ms: int, chunks: list[str]) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(ByteModel(script=b"hello world")), stream_interval_ms=interval_ms)
    body = {"model": "byte-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body, timeout=60) as reply:
        lines = [line[6:] for line in reply.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    contents = [json.loads(line)["choices"][0]["delta"].get("content") for line in lines]
    assert [c for c in contents if c] == chunks


@pytest.mark.parametrize("route", ["chat", "responses"])
def test_unicode_line_ends_in_the_text_never_cut_a_streamed_event(make_server, route: str) -> None:  # type: ignore[no-untyped-def]
    # str.splitlines(), which httpx's and requests' iter_lines use, ends a line at U+0085, U+2028 and U+2029 too.
    text = "a\u2028b\x85c\u2029d"
    server = make_server(Engine(ByteModel(script=text.encode())))
    if route == "chat":
        url, body = "chat/completions", {"model": "byte-model", "messages": [{"role": "user", "content": "hi"}],
                                         "stream": True}
    else:
        url, body = "responses", {"model": "byte-model", "input": "hi", "stream": True}
    with httpx.stream("POST", f"{server.url}/{url}", json=body, timeout=60) as reply:
        events = [json.loads(line[6:]) for line in reply.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    if route == "chat":
        streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    else:
        streamed = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert streamed == text
