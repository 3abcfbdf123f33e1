"""Thinking turns on a byte model with a SmolLM3-style template: budgets, splitting, token counts."""

from __future__ import annotations

import json

import jsonschema
import pytest

from smolrun.engine import Engine
from smolrun.turn import (
    Done,
    Event,
    Message,
    Reasoning,
    ReasoningDelta,
    ResponseFormat,
    SamplingParams,
    TextDelta,
    Turn,
)
from tests.fakes import ThinkingModel

ASK = (Message("user", "Plan a trip."),)
SCHEMA = {"type": "object", "properties": {"days": {"type": "integer"}}, "required": ["days"],
          "additionalProperties": False}


def run(engine: Engine, turn: Turn) -> tuple[str, str, Done]:
    events: list[Event] = list(engine.generate(engine.prepare(turn)))
    thought = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    answer = "".join(e.text for e in events if isinstance(e, TextDelta))
    done = events[-1]
    assert isinstance(done, Done)
    return thought, answer, done


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [20, 60])
def test_the_grammar_closes_the_think_block_at_the_budget(seed: int, budget: int) -> None:
    engine = Engine(ThinkingModel(seed=seed))  # random thoughts: they never close by themselves
    turn = Turn(ASK, ResponseFormat("json_schema", SCHEMA), SamplingParams(max_tokens=200, seed=seed),
                reasoning=Reasoning(budget=budget))
    thought, answer, done = run(engine, turn)
    assert done.finish_reason == "stop"
    assert done.stats.reasoning_tokens == budget  # random thoughts used all of it, and not a token more
    assert thought
    jsonschema.validate(json.loads(answer), SCHEMA)


@pytest.mark.parametrize("silent_tags", [False, True])
def test_a_closed_thought_splits_from_the_answer_and_counts_its_tokens(silent_tags: bool) -> None:
    script = b'<think>two days</think>\n\n{"days":2}'
    engine = Engine(ThinkingModel(script=script, silent_tags=silent_tags))
    thought, answer, done = run(engine, Turn(ASK, ResponseFormat("json_schema", SCHEMA), reasoning=Reasoning("low")))
    assert (thought, answer) == ("two days", '{"days":2}')
    assert done.stats.reasoning_tokens == 1 + len("two days") + 1  # the tags are one token each
    assert done.stats.completion_tokens == 10 + len('\n\n{"days":2}')


def test_a_thought_cut_by_max_tokens_is_all_reasoning() -> None:
    engine = Engine(ThinkingModel(seed=1))
    thought, answer, done = run(engine, Turn(ASK, params=SamplingParams(max_tokens=20, temperature=0)))
    assert done.finish_reason == "length"
    assert answer == ""
    assert done.stats.reasoning_tokens == done.stats.completion_tokens == 20
    assert thought


def test_effort_none_switches_thinking_off() -> None:
    engine = Engine(ThinkingModel(script=b"Hello"))
    turn = Turn(ASK, reasoning=Reasoning("none"))
    prepared = engine.prepare(turn)
    assert prepared.think is None and prepared.grammar is None  # free text: nothing to enforce
    assert engine.render(turn).endswith("<|im_start|>assistant\n<think>\n\n</think>\n")
    thought, answer, done = run(engine, turn)
    assert (thought, answer, done.stats.reasoning_tokens) == ("", "Hello", 0)


def test_thinking_comes_before_tool_calls_and_code() -> None:
    from smolrun.turn import Tool, ToolUse

    tools = ToolUse((Tool("f", {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                                "additionalProperties": False}),), choice="required")
    script = b'<think>call f</think>\n<tool_call>{"name":"f","arguments":{"x":1}}</tool_call>'
    engine = Engine(ThinkingModel(script=script))
    thought, answer, _ = run(engine, Turn(ASK, tools=tools))
    assert thought == "call f"
    assert answer == '<tool_call>{"name":"f","arguments":{"x":1}}</tool_call>'
