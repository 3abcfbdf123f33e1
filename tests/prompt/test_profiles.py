"""Snapshot tests of rendered prompts per model profile (SMOLRUN_UPDATE_SNAPSHOTS=1 rewrites them)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from smolrun.engine import Engine
from smolrun.errors import InvalidRequest
from smolrun.prompt import render
from smolrun.prompt.profiles import BUDGETS, detect
from smolrun.turn import Message, Reasoning, Tool, ToolCall, ToolUse, Turn
from tests.fakes import TEMPLATES, ByteModel, ThinkingModel

SNAPSHOTS = Path(__file__).parent / "snapshots"
WEATHER = ToolUse((Tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}},
                                        "required": ["city"]}, "Current weather in a city"),))
CHAT = (Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"),
        Message("user", "Weather in Paris?"))
ROUND_TRIP = (*CHAT, Message("assistant", "", (ToolCall("call_1", "get_weather", '{"city":"Paris"}'),)),
              Message("tool", '{"temp_c": 21}', tool_call_id="call_1"))


def check_snapshot(name: str, text: str) -> None:
    text = re.sub(r"Today Date: .*", "Today Date: <today>", text)
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("SMOLRUN_UPDATE_SNAPSHOTS") == "1":
        path.write_text(text)
    assert path.exists(), f"no snapshot {path.name}: run with SMOLRUN_UPDATE_SNAPSHOTS=1 and review it"
    assert text == path.read_text()


class GemmaModel(ByteModel):
    chat_template = (TEMPLATES / "gemma3.jinja").read_text()
    bos_token = "<bos>"


@pytest.mark.parametrize(("name", "turn"), [
    ("smollm3_think", Turn(CHAT)),
    ("smollm3_no_think", Turn(CHAT, reasoning=Reasoning("none"))),
    ("smollm3_flag_no_think", Turn((Message("system", "/no_think Be brief."), *CHAT[1:]))),
    ("smollm3_tools_round_trip", Turn(ROUND_TRIP, tools=WEATHER)),
])
def test_smollm3_prompts(name: str, turn: Turn) -> None:
    engine = Engine(ThinkingModel())
    assert engine.profile.name == "smollm3"
    check_snapshot(name, engine.render(turn, thinks=engine.think_block(turn) is not None))


def test_gemma3_prompts_merge_turns_of_one_role() -> None:
    engine = Engine(GemmaModel())
    assert engine.profile.name == "gemma3"
    check_snapshot("gemma3_tools_round_trip", engine.render(Turn(ROUND_TRIP, tools=WEATHER)))
    with pytest.raises(InvalidRequest, match="alternate"):  # what the merge avoids
        render(GemmaModel.chat_template, (Message("user", "a"), Message("user", "b")))


def test_generic_prompts_use_chatml_and_a_tool_note() -> None:
    engine = Engine(ByteModel())
    assert engine.profile.name == "generic"
    check_snapshot("generic_tools_round_trip", engine.render(Turn(ROUND_TRIP, tools=WEATHER)))


@pytest.mark.model
def test_smollm2_prompt_from_the_gguf_template(engine: Engine) -> None:
    assert engine.profile.name == "chatml"
    assert engine.profile.thinking is None
    check_snapshot("smollm2_tools_round_trip", engine.render(Turn(ROUND_TRIP, tools=WEATHER)))
    assert engine.think_block(Turn(CHAT, reasoning=Reasoning("high"))) is None  # no thinking mode: no effect


def test_detection() -> None:
    assert detect(None).name == "generic"
    assert detect("{{ '<|im_start|>' }}").name == "chatml"
    assert detect("{% if enable_thinking %}<think>{% endif %}").name == "thinking"


def test_think_budget_follows_effort_flags_and_overrides() -> None:
    profile = detect(ThinkingModel.chat_template)
    user = (Message("user", "Hi"),)
    assert profile.think_budget(user, Reasoning()) == BUDGETS["medium"]
    assert profile.think_budget(user, Reasoning("low")) == BUDGETS["low"]
    assert profile.think_budget(user, Reasoning("none")) is None
    assert profile.think_budget(user, Reasoning("high", budget=50)) == 50
    assert profile.think_budget((Message("system", "/no_think"), *user), Reasoning("high")) is None
    assert profile.think_budget((Message("system", "/think"), *user), Reasoning("none")) == BUDGETS["medium"]
