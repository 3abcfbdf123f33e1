"""Continuous batching (backends/batch.py) with the byte-level fake: a request decodes exactly the same alone or
in a batch, prompts are chunked, the prefix cache picks the best slot, a full cache pauses and resumes."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pytest

from smolrun.backends.base import Feed, reusable_prefix
from smolrun.backends.batch import BatchEngine, BatchLoop, Job
from smolrun.engine import Engine
from smolrun.errors import SHUTTING_DOWN, GenerationFailed, QueueFull, ServerShuttingDown
from smolrun.turn import (
    Done,
    Event,
    Message,
    ReasoningDelta,
    ResponseFormat,
    SamplingParams,
    TextDelta,
    Tool,
    ToolUse,
    Turn,
)
from tests.fakes import EOS, BatchByteModel

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}}}
WEATHER = ToolUse((Tool("get_weather", {"type": "object", "additionalProperties": False, "required": ["city"],
                                        "properties": {"city": {"type": "string", "maxLength": 10}}}, strict=True),),
                  choice="required")


def turn(text: str, fmt: ResponseFormat | None = None, tools: ToolUse | None = None, **params: object) -> Turn:
    return Turn((Message("user", text),), fmt or ResponseFormat(), SamplingParams(**params),  # type: ignore[arg-type]
                tools or ToolUse())


# Sampled turns carry a seed: an unseeded one draws from the OS, and would differ from run to run.
TURNS: dict[str, Turn] = {
    "schema": turn("a person", ResponseFormat("json_schema", PERSON, strict=True), max_tokens=80, seed=1),
    "tools": turn("weather in Paris?", tools=WEATHER, max_tokens=80, seed=2),
    "free greedy": turn("hello", max_tokens=40, temperature=0),
    "stop": turn("count", max_tokens=60, stop=("0",), seed=3),
    "short budget": turn("anything", max_tokens=3, seed=6),
    "penalties": turn("repeat", max_tokens=30, frequency_penalty=1.0, presence_penalty=0.5, seed=5),
    "json object": turn("an object", ResponseFormat("json_object"), max_tokens=40, top_p=0.9, seed=8),
    "long prompt": turn("x" * 150, max_tokens=10, temperature=0),
    "cancelled": turn("cancel me", max_tokens=60, temperature=0),
    "grammar error": turn("break", ResponseFormat("json_schema", PERSON, strict=True), max_tokens=60,
                          temperature=0),
    # A budget its random answer overruns: the document is closed at the budget, in a batch as alone.
    "closed at the budget": turn("a person", ResponseFormat("json_schema", PERSON, strict=True), max_tokens=24,
                                 seed=3, dry_multiplier=0.0),
}


@dataclass
class Run:
    """What one request produced, without the timings (they differ between runs)."""

    events: list[tuple[object, ...]] = field(default_factory=list)
    error: str | None = None
    ended: bool = False
    batches: int = 0  # event batches received so far


def _shape(event: Event) -> tuple[object, ...]:
    if isinstance(event, Done):
        s = event.stats
        return ("done", event.finish_reason, s.prompt_tokens, s.completion_tokens, s.forced_tokens, s.forward_passes,
                s.reasoning_tokens)
    if isinstance(event, ReasoningDelta):
        return ("thought", event.text)
    assert isinstance(event, TextDelta)
    return ("text", event.text, event.tokens, event.branch)


def make_job(engine: Engine, name: str, run: Run) -> Job:
    def sink(item: list[Event] | BaseException | None) -> None:
        if item is None:
            run.ended = True
        elif isinstance(item, BaseException):
            run.error = f"{type(item).__name__}: {item}"
        else:
            run.events += [_shape(e) for e in item]
            run.batches += 1
            if name == "grammar error" and run.batches == 2:  # the matcher fails from the next step on
                matcher = job.state.matcher
                assert matcher is not None
                matcher.consume_token(0)  # a NUL byte is nowhere in the schema's language

    cancelled: Callable[[], bool] = (lambda: run.batches >= 4) if name == "cancelled" else (lambda: False)
    job = engine.job(engine.prepare(TURNS[name]), sink, cancelled)
    return job


def run_alone(name: str) -> Run:
    engine = Engine(BatchByteModel())
    loop = BatchLoop(engine.model)  # type: ignore[arg-type]
    run = Run()
    loop.submit(make_job(engine, name, run))
    while loop.busy:
        loop.step()
    return run


def test_a_batch_gives_each_request_exactly_what_it_gives_alone() -> None:
    alone = {name: run_alone(name) for name in TURNS}
    assert alone["cancelled"].events[-1][:2] == ("done", "cancelled")
    assert alone["grammar error"].error is not None and "grammar" in alone["grammar error"].error
    assert alone["short budget"].events[-1][:2] == ("done", "length")
    closed = alone["closed at the budget"].events
    assert "".join(e[1] for e in closed if e[0] == "text") == '{"name":"*伀}","age":0}'
    assert closed[-1][:4] == ("done", "length", closed[-1][2], 24)

    engine = Engine(BatchByteModel(n_seq=4))
    model = engine.model
    loop = BatchLoop(model)  # type: ignore[arg-type]
    together = {name: Run() for name in TURNS}
    names = list(TURNS)
    for name in names[:3]:
        loop.submit(make_job(engine, name, together[name]))
    steps = 0
    while loop.busy or names[3:]:
        if steps % 3 == 2 and names[3:]:  # the rest arrive while others decode, and join the running batch
            name = names.pop(3)
            loop.submit(make_job(engine, name, together[name]))
        loop.step()
        steps += 1
    for name in TURNS:
        assert together[name] == alone[name], name
        assert together[name].ended or together[name].error is not None
    assert max(len({f.seq for f in p}) for p in model.passes) == 4  # it did batch: four sequences in a pass


def test_long_prompts_are_chunked_and_never_stall_decoding() -> None:
    engine = Engine(BatchByteModel(n_batch=16))
    model = engine.model
    loop = BatchLoop(model)  # type: ignore[arg-type]
    first, second = Run(), Run()
    loop.submit(make_job(engine, "free greedy", first))
    while not first.events:
        loop.step()
    decoding = loop.slots[0].seq
    loop.submit(make_job(engine, "long prompt", second))
    passes_before = len(model.passes)
    while loop.busy:
        loop.step()
    later = model.passes[passes_before:]
    assert all(sum(len(f.tokens) for f in p) <= 16 for p in model.passes)
    prefill = [p for p in later if any(f.seq != decoding and len(f.tokens) > 2 for f in p)]
    assert len(prefill) >= 10  # the 150-byte prompt took many passes ...
    assert all(any(f.seq == decoding for f in p) for p in prefill if not first.ended)  # ... none without the other
    assert first == run_alone("free greedy") and second == run_alone("long prompt")


def test_a_new_request_shares_the_longest_prefix_any_slot_holds() -> None:
    model = BatchByteModel(n_seq=3)
    engine = Engine(model)
    loop = BatchLoop(engine.model)  # type: ignore[arg-type]

    def finish(text: str) -> int:
        done: list[Done] = []
        loop.submit(engine.job(engine.prepare(turn(text, max_tokens=5, temperature=0)),
                               lambda item: done.extend(e for e in item or [] if isinstance(e, Done))
                               if not isinstance(item, BaseException) else None, lambda: False))
        while loop.busy:
            loop.step()
        return done[0].stats.cached_tokens

    def prompt(text: str) -> list[int]:
        return engine.prepare(turn(text, max_tokens=5)).prompt

    assert finish("the shared system prompt, then question one") == 0
    first = list(loop.slots[0].tokens)
    head = reusable_prefix(first, prompt("something else entirely"))
    assert head > 10  # the template's opening
    assert finish("something else entirely") == head
    assert loop.slots[0].tokens == first  # it took an empty slot: the first cache stays whole
    assert model.shared == [(0, 1, 0, head)]
    expected = reusable_prefix(first, prompt("the shared system prompt, then question two"))
    assert expected > head + 20
    assert finish("the shared system prompt, then question two") == expected
    assert model.shared[1] == (0, 2, 0, expected)
    assert finish("the shared system prompt, then question one") == len(prompt("the shared system prompt, "
                                                                               "then question one")) - 1
    assert len(model.shared) == 2  # no slot is empty: the one holding most of the prompt is reused, nothing to copy


def test_a_shared_prefix_takes_its_cells_once_in_the_cache() -> None:
    system = "You answer in one word. " * 6
    questions = [turn(system + q, max_tokens=6, temperature=0) for q in ("Red?", "Blue?", "Green?")]

    def scenario(n_ctx: int) -> tuple[list[list[Feed]], list[Done]]:
        engine = Engine(BatchByteModel(n_seq=3, n_ctx=n_ctx, n_batch=64))
        loop = BatchLoop(engine.model)  # type: ignore[arg-type]
        dones: list[Done] = []

        def submit(t: Turn) -> None:
            loop.submit(engine.job(engine.prepare(t), lambda item: dones.extend(
                e for e in item or [] if isinstance(e, Done)) if not isinstance(item, BaseException) else None,
                lambda: False))

        submit(questions[0])
        for _ in range(3):  # its prompt is in the cache before the others come to share it
            loop.step()
        for t in questions[1:]:
            submit(t)
        while loop.busy:
            loop.step()
        return engine.model.passes, dones  # type: ignore[attr-defined]

    roomy_passes, roomy = scenario(4096)
    prompts = [len(Engine(BatchByteModel()).prepare(t).prompt) for t in questions]
    shared = roomy[1].stats.cached_tokens
    assert shared == roomy[2].stats.cached_tokens > len(system)  # the later two share the system prompt
    needed = sum(prompts) - 2 * shared + 3 * 6  # every distinct cell, shared ones once
    assert sum(prompts) + 3 * 6 > needed + 2  # counted once per sequence, they would not fit
    tight_passes, tight = scenario(needed + 2)
    def counts(dones: list[Done]) -> list[tuple[object, ...]]:
        return [(d.finish_reason, d.stats.prompt_tokens, d.stats.completion_tokens, d.stats.cached_tokens)
                for d in dones]

    assert counts(tight) == counts(roomy)
    assert tight_passes == roomy_passes  # the same passes: nothing was emptied, paused or recomputed


def test_a_full_cache_pauses_the_newest_request_and_cuts_nothing() -> None:
    names = ["free greedy", "penalties", "json object"]
    engine = Engine(BatchByteModel(n_seq=3, n_ctx=120))
    loop = BatchLoop(engine.model)  # type: ignore[arg-type]
    runs = {name: Run() for name in names}
    for name in names:
        loop.submit(make_job(engine, name, runs[name]))
    while loop.busy:
        loop.step()
    for name in names:
        small = Engine(BatchByteModel(n_seq=1, n_ctx=120))
        alone, one = Run(), BatchLoop(small.model)  # type: ignore[arg-type]
        one.submit(make_job(small, name, alone))
        while one.busy:
            one.step()
        assert runs[name] == alone, name


def test_seeded_requests_evaluate_their_whole_prompt() -> None:
    engine = Engine(BatchByteModel(n_seq=1))
    loop = BatchLoop(engine.model)  # type: ignore[arg-type]
    dones: list[Done] = []
    for _ in range(2):
        loop.submit(engine.job(engine.prepare(turn("same prompt", max_tokens=5, seed=1)),
                               lambda item: dones.extend(e for e in item or [] if isinstance(e, Done))
                               if not isinstance(item, BaseException) else None, lambda: False))
        while loop.busy:
            loop.step()
    assert [d.stats.cached_tokens for d in dones] == [0, 0]


def test_the_engine_thread_bounds_its_queue() -> None:
    engine = Engine(BatchByteModel(n_seq=1), max_queue=1)
    runner = BatchEngine(engine.model, max_queue=1)  # type: ignore[arg-type]
    release = threading.Event()
    # The first request's sink holds the batch thread until release: it keeps the only sequence however fast the
    # fake decodes (it would otherwise end 4000 tokens before the test's next lines on a quick machine).
    runner.enqueue(engine.job(engine.prepare(turn("hold", max_tokens=4000, temperature=0)),
                             lambda item: release.wait(10), release.is_set))
    waiting = engine.job(engine.prepare(turn("wait", max_tokens=5)), lambda item: None, lambda: False)
    while runner.waiting() != 0:  # until the first holds the only sequence
        time.sleep(0.001)
    runner.enqueue(waiting)
    with pytest.raises(QueueFull):
        runner.enqueue(engine.job(engine.prepare(turn("one too many", max_tokens=5)), lambda item: None,
                                 lambda: False))
    # The next turn of a response already admitted (the code loop's) is never refused: nothing accepted is lost.
    ended = threading.Event()
    later = engine.job(engine.prepare(turn("a later turn", max_tokens=5)),
                       lambda item: ended.set() if item is None else None, lambda: False)
    runner.enqueue(later, bounded=False)
    assert runner.waiting() == 2
    release.set()
    assert ended.wait(10)
    runner.close()


def test_an_engine_failure_reaches_every_request_and_the_thread_lives() -> None:
    class Broken(BatchByteModel):
        fail = True

        def decode(self, feeds):  # type: ignore[no-untyped-def]
            if self.fail:
                self.fail = False
                raise RuntimeError("device lost")
            return super().decode(feeds)

    engine = Engine(Broken())
    events = list(_collect(engine, "free greedy", expect_error=True))
    assert events == ["GenerationFailed: generation failed: RuntimeError: device lost"]
    again = [e for e in engine.generate(engine.prepare(TURNS["free greedy"])) if isinstance(e, Done)]
    assert _shape(again[0]) == run_alone("free greedy").events[-1]  # the next request is served as usual
    engine.close()


def _collect(engine: Engine, name: str, expect_error: bool) -> list[str]:
    try:
        list(engine.generate(engine.prepare(TURNS[name])))
    except GenerationFailed as exc:
        assert expect_error
        return [f"GenerationFailed: {exc}"]
    return []


def test_thinking_budgets_hold_in_a_batch_as_alone() -> None:
    from smolrun.turn import Reasoning
    from tests.fakes import BatchThinkingModel

    def think(budget: int, seed: int) -> Turn:
        return Turn((Message("user", "think first"),), ResponseFormat("json_schema", PERSON, strict=True),
                    SamplingParams(max_tokens=120, seed=seed), reasoning=Reasoning(budget=budget))

    turns = [think(8, 1), think(20, 2), think(40, 3), turn("plain", max_tokens=20, seed=4)]

    def run(batch: list[Turn]) -> list[Run]:
        engine = Engine(BatchThinkingModel())
        loop = BatchLoop(engine.model)  # type: ignore[arg-type]
        runs = [Run() for _ in batch]
        for t, r in zip(batch, runs, strict=True):
            def sink(item, r=r):  # type: ignore[no-untyped-def]
                if item is None:
                    r.ended = True
                elif isinstance(item, BaseException):
                    r.error = str(item)
                else:
                    r.events += [_shape(e) for e in item]
            loop.submit(engine.job(engine.prepare(t), sink, lambda: False))
        while loop.busy:
            loop.step()
        return runs

    together = run(turns)
    assert together == [run([t])[0] for t in turns]
    for budget, r in zip((8, 20, 40), together, strict=False):
        assert r.events[-1][-1] == budget  # reasoning tokens: the block, tags included, closed at its budget
        thought = "".join(str(e[1]) for e in r.events if e[0] == "thought")
        assert thought and "think>" not in thought  # the tags are not thought
        assert json.loads("".join(str(e[1]) for e in r.events if e[0] == "text"))  # then the answer, on its own


class SinkGone(Exception):
    """What a request's sink raises in these tests (its client's event loop closed, say)."""


def _failing(calls: list[object]) -> Callable[[object], None]:
    def sink(item: object) -> None:
        calls.append(item)
        raise SinkGone("the client's event loop is closed")
    return sink


def _errors(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    return [(r.name, r.getMessage(), repr(r.exc_info[1]) if r.exc_info else "") for r in caplog.records
            if r.levelno >= logging.ERROR]


SINK_FAILED = ("smolrun", "a request's event sink failed: the request is dropped",
               "SinkGone(\"the client's event loop is closed\")")


def test_a_sink_that_raises_ends_its_own_request_only(caplog: pytest.LogCaptureFixture) -> None:
    engine = Engine(BatchByteModel(n_seq=2))
    model = engine.model
    loop = BatchLoop(model)  # type: ignore[arg-type]
    calls: list[object] = []
    loop.submit(engine.job(engine.prepare(TURNS["free greedy"]), _failing(calls), lambda: False))  # slot 0
    other = Run()
    loop.submit(make_job(engine, "schema", other))  # slot 1, in the same passes
    steps = 0
    while loop.busy and steps < 1000:
        loop.step()
        steps += 1
    assert not loop.busy
    assert len(calls) == 1 and isinstance(calls[0], list)  # its first events, then nothing: no error, no end
    assert _errors(caplog) == [SINK_FAILED]  # logged once, with the exception
    assert (loop.slots[0].job, loop.slots[0].tokens, model.kv[0], model.cells[0]) == (None, [], [], [])  # type: ignore[attr-defined]
    assert other == run_alone("schema")  # the other request in the batch went on, untouched
    later = Run()
    loop.submit(make_job(engine, "free greedy", later))
    while loop.busy and steps < 2000:
        loop.step()
        steps += 1
    assert later == run_alone("free greedy")  # and so does a later one


def _until(done: Callable[[], bool], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.001)
    return done()


def test_a_sink_that_raises_leaves_the_engine_thread_serving(caplog: pytest.LogCaptureFixture) -> None:
    engine = Engine(BatchByteModel(n_seq=2))
    runner = BatchEngine(engine.model, max_queue=4)  # type: ignore[arg-type]
    calls: list[object] = []
    runner.enqueue(engine.job(engine.prepare(TURNS["free greedy"]), _failing(calls), lambda: False))
    beside, later = Run(), Run()
    runner.enqueue(make_job(engine, "schema", beside))
    assert _until(lambda: beside.ended or beside.error is not None)
    runner.enqueue(make_job(engine, "penalties", later))
    assert _until(lambda: later.ended or later.error is not None)
    runner.close()
    assert len(calls) == 1 and _errors(caplog) == [SINK_FAILED]
    assert (beside, later) == (run_alone("schema"), run_alone("penalties"))


class Endless(BatchByteModel):
    """Never ends on its own (EOS banned), 5 ms a pass: a request is still decoding when close() comes."""

    def decode(self, feeds: Sequence[Feed]) -> list[npt.NDArray[np.float32]]:
        time.sleep(0.005)
        return super().decode(feeds)

    def _logits(self, history: list[int]) -> npt.NDArray[np.float32]:
        logits = super()._logits(history)
        logits[EOS] = -np.inf
        return logits


async def _outcome(events: AsyncIterator[Event]) -> tuple[int, tuple[str, int, str] | None]:
    """How many events a stream gave, and the error it ended with."""
    count = 0
    try:
        async for _ in events:
            count += 1
    except ServerShuttingDown as exc:
        return count, (type(exc).__name__, exc.status, exc.message)
    return count, None


def test_close_ends_the_live_and_the_queued_request_and_stops_the_thread() -> None:
    engine = Engine(Endless(n_seq=1))
    prepared = engine.prepare(turn("go on", max_tokens=4000, temperature=0))

    async def scenario() -> tuple[list[tuple[int, tuple[str, int, str] | None]], int, bool]:
        live, queued = engine.stream(prepared), engine.stream(prepared)
        await asyncio.wait_for(live.__anext__(), 10)  # decoding: it holds the only sequence ...
        waiting = engine.waiting()  # ... and the other waits for it
        runner = engine._runner
        assert isinstance(runner, BatchEngine)
        await asyncio.to_thread(engine.close)
        alive = runner._thread.is_alive()
        ends = [await asyncio.wait_for(_outcome(s), 10) for s in (live, queued)]
        return ends, waiting, alive

    ends, waiting, alive = asyncio.run(scenario())
    error = ("ServerShuttingDown", 503, "the server is shutting down: the request was not finished")
    assert error[2] == SHUTTING_DOWN
    assert (waiting, alive) == (1, False)
    assert ends[0][1] == error and ends[0][0] < 4000  # the live one, cut short
    assert ends[1] == (0, error)  # the queued one, never started


def test_close_waits_for_the_thread_before_another_runner_starts() -> None:
    """A forward pass outlasting close()'s wait must not leave its thread running beside a new one (two threads
    on one llama.cpp context): a later turn starts its runner once the old thread has exited."""
    in_pass, release = threading.Event(), threading.Event()

    class Held(Endless):
        def decode(self, feeds: Sequence[Feed]) -> list[npt.NDArray[np.float32]]:
            if self.passes:  # the request is decoding: hold this pass (1 s at most)
                in_pass.set()
                release.wait(1)
            return super().decode(feeds)

    engine = Engine(Held(n_seq=1))
    old = list(engine.generate(engine.prepare(turn("warm", max_tokens=1, temperature=0))))  # starts the runner
    assert isinstance(old[-1], Done)
    first = engine._runner
    assert isinstance(first, BatchEngine)
    live = engine.generate(engine.prepare(turn("go on", max_tokens=4000, temperature=0)))
    assert in_pass.wait(10)
    closer = threading.Thread(target=engine.close)
    closer.start()
    assert _until(lambda: engine._runner is None)  # close() has begun: the old thread is still in its pass
    later = engine.generate(engine.prepare(turn("later", max_tokens=3, temperature=0)))  # a new runner
    old_alive = first._thread.is_alive()
    release.set()
    closer.join(10)
    assert not old_alive  # the new runner started only once the old thread had exited
    with pytest.raises(ServerShuttingDown):
        list(live)
    assert isinstance(list(later)[-1], Done)  # and it serves
    engine.close()


def test_a_scored_prompt_gets_each_tokens_logprob_across_chunks() -> None:
    from smolrun.turn import TEXT

    engine = Engine(BatchByteModel(n_batch=32))
    model = engine.model
    prompt = "a prompt longer than one pass of thirty-two tokens, scored token by token"
    prepared = engine.prepare_prompt(prompt, TEXT, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2))
    done: list[Done] = []

    def sink(item):  # type: ignore[no-untyped-def]
        if isinstance(item, list):
            done.extend(e for e in item if isinstance(e, Done))

    loop = BatchLoop(model)  # type: ignore[arg-type]
    loop.submit(engine.job(prepared, sink, lambda: False))
    while loop.busy:
        loop.step()
    assert len(done) == 1
    tokens = prepared.prompt
    scored = done[0].prompt_logprobs
    assert [s.token for s in scored] == tokens[1:]  # every token but the first, which nothing predicts
    for at, s in enumerate(scored, start=1):
        row = model._logits(tokens[:at]).astype(np.float64)  # the fake's logits: a function of the history
        row -= row.max() + np.log(np.exp(row - row.max()).sum())
        assert s.logprob == pytest.approx(row[tokens[at]], abs=1e-5)
        assert [t for t, _ in s.top] == [int(t) for t in np.argsort(-row, kind="stable")[:2]]
