"""Engine.prepare's bounds: a prompt too long for the context is refused before it is tokenized, and
preparation is admitted like generation (at most max_queue at once, then QueueFull). The one-sequence runner:
its bounds, a sink that raises, close()."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from smolrun.backends.decode import Prepared
from smolrun.engine import Engine
from smolrun.errors import SHUTTING_DOWN, ContextLengthExceeded, QueueFull, ServerShuttingDown
from smolrun.scheduler import Scheduler
from smolrun.turn import Message, TextDelta, Turn
from tests.fakes import ByteModel


def test_a_prompt_longer_than_the_context_can_hold_is_refused_without_tokenizing() -> None:
    model = ByteModel(n_ctx=64)
    engine = Engine(model)
    longest = max(len(model.lltokenizer.decode_bytes([t])) for t in range(model.lltokenizer.vocab_size))
    assert longest == len(b"<eos>")  # the special token's text is the longest one token stands for

    def tokenize(text: str) -> list[int]:
        raise AssertionError("tokenized")

    model.tokenize = tokenize  # type: ignore[method-assign]
    with pytest.raises(ContextLengthExceeded) as err:
        engine.prepare(Turn((Message("user", "x" * 64 * longest),)))
    assert (err.value.param, err.value.code) == ("messages", "context_length_exceeded")


def test_a_prompt_within_the_bound_is_tokenized_and_checked_exactly() -> None:
    engine = Engine(ByteModel(n_ctx=64))
    long, short = Turn((Message("user", "x" * 80),)), Turn((Message("user", "x"),))
    used = len(engine.render(long).encode())  # one byte a token; under 64 * 5 characters, over 64 tokens
    with pytest.raises(ContextLengthExceeded) as err:
        engine.prepare(long)
    assert err.value.message == f"This model's maximum context length is 64 tokens, but the messages use {used}."
    assert len(engine.prepare(short).prompt) == len(engine.render(short).encode())


def test_preparation_is_admitted_like_generation() -> None:
    engine = Engine(ByteModel(), max_queue=2)
    release = threading.Event()
    started = threading.Semaphore(0)
    real = engine.prepare

    def slow(turn: Turn, allow_code: bool = False, must_code: bool = False, continuing: bool = False) -> Prepared:
        started.release()
        release.wait(10)
        return real(turn, allow_code, must_code, continuing)

    engine.prepare = slow  # type: ignore[method-assign]

    async def scenario() -> list[int]:
        turn = Turn((Message("user", "hi"),))
        held = [asyncio.create_task(engine.prepare_async(turn)) for _ in range(2)]
        await asyncio.to_thread(started.acquire)
        await asyncio.sleep(0)  # both tasks have entered prepare_async and hold its two places
        with pytest.raises(QueueFull):
            await engine.prepare_async(turn)
        later = asyncio.create_task(engine.prepare_async(turn, continuing=True))  # a later turn: never refused
        release.set()
        held.append(later)
        done = await asyncio.gather(*held)
        return [len(p.prompt) for p in done] + [len((await engine.prepare_async(turn)).prompt)]

    expected = len(engine.render(Turn((Message("user", "hi"),))).encode())
    assert asyncio.run(scenario()) == [expected] * 4


def test_the_one_sequence_runner_bounds_new_turns_and_never_a_continuing_one() -> None:
    runner = Scheduler(max_queue=1)
    release, started = threading.Event(), threading.Event()
    ended: list[str] = []

    def work(name: str, hold: bool = False):  # type: ignore[no-untyped-def]
        def run(cancelled):  # type: ignore[no-untyped-def]
            started.set()
            if hold:
                release.wait(10)
            ended.append(name)
            return iter(())
        return run

    runner.enqueue(work("running", hold=True), lambda item: None, lambda: False)
    assert started.wait(10)  # it holds the model; the queue is empty
    runner.enqueue(work("waiting"), lambda item: None, lambda: False)
    with pytest.raises(QueueFull):
        runner.enqueue(work("refused"), lambda item: None, lambda: False)
    last = threading.Event()
    runner.enqueue(work("continuing"), lambda item: last.set() if item is None else None, lambda: False,
                  bounded=False)
    assert runner.waiting() == 2
    release.set()
    assert last.wait(10)  # close() would end the queued turns: it comes once they have run
    runner.close()
    assert ended == ["running", "waiting", "continuing"]


class _Turn:
    """A turn's work for the Scheduler: `tokens` text deltas, a millisecond each, stopping when cancelled."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.stopped = threading.Event()  # its generator was closed or ran out

    def __call__(self, cancelled):  # type: ignore[no-untyped-def]
        try:
            for _ in range(self.tokens):
                if cancelled():
                    return
                time.sleep(0.001)
                yield TextDelta("x", (120,))
        finally:
            self.stopped.set()


class _Heard:
    """A sink that keeps what it hears, errors as (type, message)."""

    def __init__(self) -> None:
        self.items: list[object] = []
        self.ended = threading.Event()

    def __call__(self, item: object) -> None:
        self.items.append((type(item).__name__, str(item)) if isinstance(item, BaseException) else item)
        if item is None:
            self.ended.set()


def test_a_sink_that_raises_ends_its_own_turn_only_on_the_one_sequence_runner(
        caplog: pytest.LogCaptureFixture) -> None:
    runner = Scheduler(max_queue=4)
    calls: list[object] = []

    def failing(item: object) -> None:
        calls.append(item)
        raise RuntimeError("the client's event loop is closed")

    long, short, heard = _Turn(10_000), _Turn(2), _Heard()
    runner.enqueue(long, failing, lambda: False)
    runner.enqueue(short, heard, lambda: False)
    assert heard.ended.wait(10)  # the thread lives and serves the next turn
    runner.close()
    assert len(calls) == 1 and long.stopped.is_set()  # its first event, then it stopped: no error, no end
    errors = [(r.getMessage(), repr(r.exc_info[1]) if r.exc_info else "") for r in caplog.records
              if r.levelno >= logging.ERROR]
    assert errors == [("a request's event sink failed: the request is dropped",
                       "RuntimeError(\"the client's event loop is closed\")")]
    assert heard.items == [[TextDelta("x", (120,))]] * 2 + [None]


def test_close_ends_the_running_and_the_queued_turns_on_the_one_sequence_runner() -> None:
    runner = Scheduler(max_queue=4)
    running, queued = _Heard(), _Heard()
    work = _Turn(10_000)  # ten seconds of tokens
    runner.enqueue(work, running, lambda: False)
    runner.enqueue(_Turn(2), queued, lambda: False)
    deadline = time.monotonic() + 10
    while not running.items and time.monotonic() < deadline:
        time.sleep(0.001)
    runner.close()
    assert not runner._thread.is_alive() and work.stopped.is_set()
    error = ("ServerShuttingDown", SHUTTING_DOWN)
    assert running.items[-2:] == [error, None] and 0 < len(running.items) - 2 < 10_000
    assert all(item == [TextDelta("x", (120,))] for item in running.items[:-2])
    assert queued.items == [error, None]
    with pytest.raises(ServerShuttingDown):
        runner.enqueue(_Turn(1), _Heard(), lambda: False)
