"""The transformers engine: a tiny random SmolLM3 (real SmolLM2 tokenizer plus SmolLM3's tags, a template
in SmolLM3's conventions) drives the SmolLM3 profile end to end; the bundled SmolLM2 GGUF loads through
`gguf_file=` so one real model runs on both engines."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import numpy as np
import pytest

pytest.importorskip("torch", reason="the transformers engine needs torch: `make test` installs it")
pytest.importorskip("transformers", reason="the transformers engine needs transformers: `make test` installs it")

from smolrun.backends.transformers import HFSource, TransformersModel, hf_source  # noqa: E402
from smolrun.config import Settings  # noqa: E402
from smolrun.engine import Engine  # noqa: E402
from smolrun.errors import ModelUnavailable  # noqa: E402
from smolrun.turn import (  # noqa: E402
    Done,
    Message,
    Reasoning,
    ReasoningDelta,
    ResponseFormat,
    SamplingParams,
    TextDelta,
    Turn,
)
from tests.conftest import Server  # noqa: E402

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "days"], "additionalProperties": False}


@pytest.fixture(scope="session")
def tiny(tiny_smollm3: Path) -> Engine:
    return Engine.load(Settings(backend="transformers", model=str(tiny_smollm3), threads=2, n_ctx=2048))


def run(engine: Engine, turn: Turn) -> tuple[str, str, Done]:
    events = list(engine.generate(engine.prepare(turn)))
    done = events[-1]
    assert isinstance(done, Done)
    return ("".join(e.text for e in events if isinstance(e, ReasoningDelta)),
            "".join(e.text for e in events if isinstance(e, TextDelta)), done)


ASK = (Message("user", "Plan a trip: which city, how many days?"),)


def test_the_tiny_smollm3_gets_the_smollm3_profile(tiny: Engine) -> None:
    model = tiny.model
    assert isinstance(model, TransformersModel) and model.device == "cpu"
    assert tiny.profile.name == "smollm3"
    assert tiny.think_block(Turn(ASK)) is not None  # <think> and </think> are single tokens
    assert "Reasoning Mode: /think" in tiny.render(Turn(ASK), thinks=True)
    assert tiny.render(Turn(ASK, reasoning=Reasoning("none"))).endswith("<think>\n\n</think>\n")


def test_smollm3_code_calls_are_written_between_its_code_tokens(tiny: Engine) -> None:
    prepared = tiny.prepare(Turn(ASK, reasoning=Reasoning("none")), allow_code=True)
    assert prepared.grammar is not None
    open_, close = (tiny.grammars.term(t) for t in ("<code>", "</code>"))
    assert f"code: {open_} CODE_BODY {close}" in prepared.grammar.source and open_.startswith("<[")


@pytest.mark.parametrize("budget", [8, 30])
def test_thinking_stops_at_the_budget_then_the_answer_validates(tiny: Engine, budget: int) -> None:
    turn = Turn(ASK, ResponseFormat("json_schema", SCHEMA), SamplingParams(max_tokens=150, seed=1),
                reasoning=Reasoning("low", budget=budget))
    thought, answer, done = run(tiny, turn)
    assert done.finish_reason == "stop"
    assert 0 < done.stats.reasoning_tokens <= budget
    assert thought
    jsonschema.validate(json.loads(answer), SCHEMA)


def test_no_think_answers_without_a_think_block(tiny: Engine) -> None:
    turn = Turn(ASK, ResponseFormat("json_schema", SCHEMA), SamplingParams(max_tokens=100, seed=2),
                reasoning=Reasoning("none"))
    thought, answer, done = run(tiny, turn)
    assert thought == "" and done.stats.reasoning_tokens == 0
    jsonschema.validate(json.loads(answer), SCHEMA)


def test_prefix_reuse_gives_the_logits_of_a_full_prefill(tiny: Engine) -> None:
    model = tiny.model
    first = model.tokenize(tiny.render(Turn(ASK)))
    second = model.tokenize(tiny.render(Turn((*ASK, Message("assistant", "Rome."), Message("user", "Why?")))))
    model.prefill(first)
    reused = model.prefill(second, reuse=True).copy()
    full = model.prefill(second, reuse=False).copy()
    np.testing.assert_allclose(reused, full, rtol=1e-4, atol=1e-4)


def test_cancelling_stops_the_generation(tiny: Engine) -> None:
    calls = iter(range(100))
    events = list(tiny.generate(tiny.prepare(Turn(ASK, reasoning=Reasoning("none"))),
                                cancelled=lambda: next(calls) >= 3))
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "cancelled"
    assert done.stats.completion_tokens <= 3 * 8  # a few steps (fast-forward may add tokens per step)


def test_tool_calls_and_reasoning_through_the_sdk(tiny: Engine, make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = make_server(tiny)
    client = server.client()
    tool = {"type": "function", "function": {"name": "book", "strict": True, "parameters": SCHEMA}}
    for effort in ("none", "low"):
        r = client.chat.completions.create(
            model=tiny.name, messages=[{"role": "user", "content": "Book a trip."}], tools=[tool],  # type: ignore[list-item]
            tool_choice="required", parallel_tool_calls=False, reasoning_effort=effort, max_tokens=150, seed=3,  # type: ignore[arg-type]
            extra_body={"thinking_token_budget": 16})
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", (effort, choice.message)
        call = (choice.message.tool_calls or [])[0]
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA)  # type: ignore[union-attr]
        thinking = getattr(choice.message, "reasoning_content", None)
        assert (thinking is None) == (effort == "none")
    response = client.responses.create(model=tiny.name, input="Plan a trip.", max_output_tokens=150,
                                       reasoning={"effort": "minimal"}, extra_body={"thinking_token_budget": 12},
                                       text={"format": {"type": "json_schema", "name": "trip", "schema": SCHEMA,
                                                        "strict": True}})
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.usage is not None and 0 < response.usage.output_tokens_details.reasoning_tokens <= 12
    jsonschema.validate(json.loads(response.output_text), SCHEMA)


@pytest.fixture(scope="module")
def smollm2_hf() -> Iterator[Engine]:
    yield Engine.load(Settings(backend="transformers", model="smollm2-135m", threads=2, n_ctx=2048))


@pytest.mark.model
def test_the_bundled_gguf_runs_on_transformers_like_on_llama_cpp(smollm2_hf: Engine, engine: Engine) -> None:
    assert smollm2_hf.profile.name == engine.profile.name == "chatml"
    prompt = engine.render(Turn(ASK))
    assert smollm2_hf.model.tokenize(prompt) == engine.model.tokenize(prompt)  # one tokenizer, two engines
    turn = Turn((Message("user", "Give a trip as JSON with a city and a number of days."),),
                ResponseFormat("json_schema", SCHEMA), SamplingParams(max_tokens=60, temperature=0,
                                                                      frequency_penalty=0.5))
    _, answer, done = run(smollm2_hf, turn)
    assert done.finish_reason == "stop" and done.stats.forced_tokens > 0
    jsonschema.validate(json.loads(answer), SCHEMA)


def test_sources() -> None:
    assert hf_source("smollm3-3b") == HFSource("smollm3-3b", "HuggingFaceTB/SmolLM3-3B")
    assert hf_source("HuggingFaceTB/SmolLM3-3B") == HFSource("HuggingFaceTB/SmolLM3-3B", "HuggingFaceTB/SmolLM3-3B")


def test_a_hub_model_missing_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelUnavailable, match="hf download HuggingFaceTB/SmolLM3-3B"):
        Engine.load(Settings(backend="transformers", model="smollm3-3b", offline=True))
