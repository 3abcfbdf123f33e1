"""Engine.prepare's bounds: a prompt too long for the context is refused before it is tokenized, and
preparation is admitted like generation (at most max_queue at once, then QueueFull)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from smolrun.engine import Engine, Prepared
from smolrun.errors import ContextLengthExceeded, QueueFull
from smolrun.turn import Message, Turn
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

    def slow(turn: Turn, allow_code: bool = False, must_code: bool = False) -> Prepared:
        started.release()
        release.wait(10)
        return real(turn, allow_code, must_code)

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
    from smolrun.scheduler import Scheduler

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

    runner.submit(work("running", hold=True), lambda item: None, lambda: False)
    assert started.wait(10)  # it holds the model; the queue is empty
    runner.submit(work("waiting"), lambda item: None, lambda: False)
    with pytest.raises(QueueFull):
        runner.submit(work("refused"), lambda item: None, lambda: False)
    runner.submit(work("continuing"), lambda item: None, lambda: False, bounded=False)
    assert runner.waiting() == 2
    release.set()
    runner.close()
    assert ended == ["running", "waiting", "continuing"]
