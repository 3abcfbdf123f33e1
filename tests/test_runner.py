"""The reason -> execute -> answer loop (runner.run) on its own: a scripted `generate` plays the model's
turns and a scripted `execute` plays the sandbox, so every event of the loop is checked exactly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

from smolrun.backends.decode import Prepared
from smolrun.backends.parts import PartReader
from smolrun.engine import Engine
from smolrun.runner import (
    CodeCallItem,
    Delta,
    Finished,
    Interpreting,
    ItemAdded,
    ItemDone,
    MessageItem,
    RunEvent,
    RunSpec,
    context_messages,
    observation,
    run,
)
from smolrun.sandbox.container import ExecError, Execution
from smolrun.turn import DecodeStats, Done, Event, Message, ResponseFormat, SamplingParams, TextDelta
from tests.fakes import ByteModel

FENCE = "```python\n"


class Script:
    """The model's turns, one text each, streamed a few characters a delta; records the prompts it was given."""

    def __init__(self, engine: Engine, *turns: tuple[str, str]) -> None:
        self.engine, self.turns = engine, list(turns)  # (text, finish reason)
        self.prompts: list[str] = []

    async def generate(self, prepared: Prepared) -> AsyncIterator[Event]:
        self.prompts.append(bytes(prepared.prompt).decode())  # the byte model: one token a byte
        text, reason = self.turns.pop(0)
        # The branch as the decoder tags it, from the turn's layout (the byte model: one token a byte).
        reader = PartReader(prepared.parts, lambda t: bytes([t]))
        read = reader.read(list(text.encode())) + reader.flush()
        branch = read[0].piece if read else "text"
        assert branch != "thought"
        for i in range(0, len(text), 4):
            yield TextDelta(text[i:i + 4], branch=branch)
        yield Done(reason, DecodeStats(len(prepared.prompt), len(text), 0, len(text), 0.0, 0.0,  # type: ignore[arg-type]
                                       cached_tokens=3))


def execution(logs: str, error: ExecError | None = None) -> Execution:
    return Execution(logs, None, error, (), (), 0.01)


def events_of(spec: RunSpec, script: Script, results: list[Execution]) -> tuple[list[tuple[object, ...]], list[str]]:
    """The loop's events (without the random item ids, deltas of one item joined) and the code it ran."""
    ran: list[str] = []

    async def execute(code: str) -> tuple[str, Execution]:
        ran.append(code)
        return "cntr_1", results.pop(0)

    async def collect() -> list[RunEvent]:
        return [e async for e in run(spec, script.engine, script.generate, execute)]

    out: list[tuple[object, ...]] = []
    for e in asyncio.run(collect()):
        if isinstance(e, ItemAdded | ItemDone):
            out.append((type(e).__name__, e.index, replace(e.item, id="")))
        elif isinstance(e, Delta):
            if out and out[-1][:3] == ("Delta", e.index, e.kind):
                out[-1] = (*out[-1][:3], str(out[-1][3]) + e.text)
            else:
                out.append(("Delta", e.index, e.kind, e.text))
        elif isinstance(e, Interpreting):
            out.append(("Interpreting", e.index))
        else:
            assert isinstance(e, Finished)
            out.append(("Finished", e.status, e.input_tokens, e.output_tokens, e.incomplete_reason, e.cached_tokens))
    return out, ran


def spec(max_tool_calls: int = 4, max_tokens: int | None = None) -> RunSpec:
    return RunSpec((Message("user", "What is 6 * 7?"),), ResponseFormat(), SamplingParams(max_tokens=max_tokens),
                   code=True, max_tool_calls=max_tool_calls)


CODE = f"{FENCE}print(6 * 7)\n```"
CODE_ITEM = CodeCallItem("")
MESSAGE = MessageItem("")


def answer(text: str) -> MessageItem:
    return MessageItem("", text, "completed")


def ran_item(code: str, result: Execution) -> CodeCallItem:
    return CodeCallItem("", code, "cntr_1", "completed", result)


def test_code_then_answer_streams_every_item_and_feeds_the_output_back() -> None:
    script = Script(Engine(ByteModel()), (CODE, "stop"), ("It is 42.", "stop"))
    result = execution("42\n")
    events, ran = events_of(spec(), script, [result])
    assert ran == ["print(6 * 7)"]
    prompts = [len(p.encode()) for p in script.prompts]
    assert events == [
        ("ItemAdded", 0, CODE_ITEM),
        ("Delta", 0, "code", "print(6 * 7)"),
        ("Interpreting", 0),
        ("ItemDone", 0, ran_item("print(6 * 7)", result)),
        ("ItemAdded", 1, MESSAGE),
        ("Delta", 1, "text", "It is 42."),
        ("ItemDone", 1, answer("It is 42.")),
        ("Finished", "completed", sum(prompts), len(CODE) + len("It is 42."), None, 6),
    ]
    assert script.prompts[1].startswith(script.prompts[0])  # the next turn continues the conversation
    assert "Output of the code:\n42" in script.prompts[1].removeprefix(script.prompts[0])


def test_after_max_tool_calls_a_code_fence_is_only_answer_text() -> None:
    script = Script(Engine(ByteModel()), (CODE, "stop"), (CODE, "stop"))
    events, ran = events_of(spec(max_tool_calls=1), script, [execution("42\n")])
    assert ran == ["print(6 * 7)"]
    assert events[4:] == [("ItemAdded", 1, MESSAGE), ("Delta", 1, "text", CODE), ("ItemDone", 1, answer(CODE)),
                          ("Finished", "completed", sum(len(p.encode()) for p in script.prompts), 2 * len(CODE),
                           None, 6)]


def test_a_code_turn_cut_by_the_budget_is_never_run() -> None:
    script = Script(Engine(ByteModel()), (CODE[:-4], "length"))
    events, ran = events_of(spec(max_tokens=len(CODE) - 4), script, [])
    assert ran == []
    assert events[-2:] == [("ItemDone", 0, CodeCallItem("", "print(6 * 7)", status="incomplete")),
                           ("Finished", "incomplete", len(script.prompts[0].encode()), len(CODE) - 4,
                            "max_output_tokens", 3)]


def test_a_spent_budget_after_code_ends_before_another_turn() -> None:
    script = Script(Engine(ByteModel()), (CODE, "stop"))
    result = execution("42\n")
    events, ran = events_of(spec(max_tokens=len(CODE)), script, [result])
    assert (ran, script.turns, len(script.prompts)) == (["print(6 * 7)"], [], 1)
    assert events[-2:] == [("ItemDone", 0, ran_item("print(6 * 7)", result)),
                           ("Finished", "incomplete", len(script.prompts[0].encode()), len(CODE),
                            "max_output_tokens", 3)]


def test_an_error_in_the_code_is_an_observation_not_a_failure() -> None:
    error = ExecError("ZeroDivisionError", "division by zero", "Traceback (most recent call last):\n"
                      "ZeroDivisionError: division by zero")
    script = Script(Engine(ByteModel()), (CODE, "stop"), ("Oops.", "stop"))
    result = execution("", error)
    events, _ = events_of(spec(), script, [result])
    assert events[3] == ("ItemDone", 0, ran_item("print(6 * 7)", result))
    assert error.traceback in script.prompts[1]
    assert events[-1][:2] == ("Finished", "completed")


def test_the_output_becomes_the_conversation_a_follow_up_continues_as_the_model_saw_it() -> None:
    engine = Engine(ByteModel())
    long = execution("x" * 5000 + "\n")
    items = [CodeCallItem("ci_1", "print(6 * 7)", "cntr_1", "completed", execution("42\n")),
             CodeCallItem("ci_2", "print('x' * 5000)", "cntr_1", "completed", long),
             CodeCallItem("ci_3", "print(", status="incomplete"), MessageItem("msg_1", "It is 42.", "completed")]
    context = context_messages(items, engine.profile.code)  # type: ignore[arg-type]
    assert context == [
        Message("assistant", "```python\nprint(6 * 7)\n```"), Message("user", "Output of the code:\n42"),
        Message("assistant", "```python\nprint('x' * 5000)\n```"), observation(long),
        Message("assistant", "It is 42.")]  # the cut call never ran: it is not in the conversation
    assert len(context[3].content) < 2100  # the same truncated observation as in the loop, not 5000 characters
