"""Reasoning through both APIs on a thinking byte model: reasoning_content, reasoning items and events,
reasoning_tokens, effort "none", budgets, and the 400s."""

from __future__ import annotations

import json

import openai
import pytest

from smolrun.engine import Engine
from tests.conftest import Server
from tests.fakes import ThinkingModel

ASK = [{"role": "user", "content": "How many days in Paris?"}]
SCRIPT = b'<think>Paris: two days.</think>\n{"days":2}'
SCHEMA = {"type": "object", "properties": {"days": {"type": "integer"}}, "required": ["days"],
          "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "plan", "schema": SCHEMA, "strict": True}}
TEXT_FORMAT = {"format": {"type": "json_schema", "name": "plan", "schema": SCHEMA, "strict": True}}


def start(make_server, script: bytes | None = SCRIPT, seed: int = 0) -> Server:  # type: ignore[no-untyped-def]
    server: Server = make_server(Engine(ThinkingModel(seed=seed, script=script)))
    return server


def test_chat_returns_reasoning_content_and_counts_its_tokens(make_server) -> None:  # type: ignore[no-untyped-def]
    r = start(make_server).client().chat.completions.create(
        model="thinking-byte-model", messages=ASK, response_format=FORMAT, reasoning_effort="low")  # type: ignore[arg-type]
    message = r.choices[0].message
    assert message.content == '{"days":2}'
    assert message.reasoning_content == "Paris: two days."  # type: ignore[attr-defined]
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == 2 + len("Paris: two days.")


def test_chat_streams_reasoning_before_content(make_server) -> None:  # type: ignore[no-untyped-def]
    stream = start(make_server).client().chat.completions.create(
        model="thinking-byte-model", messages=ASK, response_format=FORMAT, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True})
    kinds: list[tuple[str, str]] = []
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            if delta.get("reasoning_content"):
                kinds.append(("reasoning", delta["reasoning_content"]))
            if delta.get("content"):
                kinds.append(("content", delta["content"]))
    assert "".join(t for k, t in kinds if k == "reasoning") == "Paris: two days."
    assert "".join(t for k, t in kinds if k == "content") == '{"days":2}'
    assert [k for k, _ in kinds] == sorted((k for k, _ in kinds), key=lambda k: k != "reasoning")
    assert usage is not None and usage.completion_tokens_details.reasoning_tokens == 18


def test_effort_none_answers_without_thinking(make_server) -> None:  # type: ignore[no-untyped-def]
    r = start(make_server, script=b'{"days":3}').client().chat.completions.create(
        model="thinking-byte-model", messages=ASK, response_format=FORMAT, reasoning_effort="none")  # type: ignore[arg-type]
    assert r.choices[0].message.content == '{"days":3}'
    assert not hasattr(r.choices[0].message, "reasoning_content")
    assert r.usage is not None and r.usage.completion_tokens_details.reasoning_tokens == 0  # type: ignore[union-attr]


@pytest.mark.parametrize("seed", range(3))
def test_the_thinking_budget_bounds_reasoning_tokens(make_server, seed: int) -> None:  # type: ignore[no-untyped-def]
    r = start(make_server, script=None, seed=seed).client().chat.completions.create(
        model="thinking-byte-model", messages=ASK, response_format=FORMAT, max_tokens=200, seed=seed,  # type: ignore[arg-type]
        extra_body={"thinking_token_budget": 30})
    assert r.usage is not None and r.usage.completion_tokens_details.reasoning_tokens == 30  # type: ignore[union-attr]
    assert r.choices[0].finish_reason == "stop"
    assert json.loads(r.choices[0].message.content or "")["days"] is not None


def test_a_bad_effort_is_a_400(make_server) -> None:  # type: ignore[no-untyped-def]
    client = start(make_server).client()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="thinking-byte-model", messages=ASK, reasoning_effort="huge")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="thinking-byte-model", input="hi", reasoning={"effort": "huge"})  # type: ignore[typeddict-item]
    assert info.value.param == "reasoning.effort"  # type: ignore[attr-defined]


def test_responses_returns_a_reasoning_item_then_the_message(make_server) -> None:  # type: ignore[no-untyped-def]
    r = start(make_server).client().responses.create(
        model="thinking-byte-model", input="How many days in Paris?", text=TEXT_FORMAT,  # type: ignore[arg-type]
        reasoning={"effort": "medium", "summary": "auto"})
    assert [item.type for item in r.output] == ["reasoning", "message"]
    reasoning = r.output[0]
    assert reasoning.content is not None and reasoning.content[0].text == "Paris: two days."  # type: ignore[union-attr]
    assert reasoning.summary[0].text == "Paris: two days."  # type: ignore[union-attr]
    assert r.output_text == '{"days":2}'
    assert r.reasoning is not None and r.reasoning.effort == "medium"
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens == 18


def test_responses_stream_emits_reasoning_events(make_server) -> None:  # type: ignore[no-untyped-def]
    client = start(make_server).client()
    with client.responses.stream(model="thinking-byte-model", input="How many days?", text=TEXT_FORMAT,  # type: ignore[arg-type]
                                 reasoning={"effort": "low", "summary": "detailed"}) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    deltas = types.index("response.reasoning_text.delta")
    assert types.index("response.output_item.added") < deltas < types.index("response.reasoning_text.done")
    assert "response.reasoning_summary_text.done" in types
    assert types.index("response.output_item.done") < types.index("response.output_text.delta")
    assert [item.type for item in final.output] == ["reasoning", "message"]


def test_a_response_cut_while_thinking_is_incomplete(make_server) -> None:  # type: ignore[no-untyped-def]
    r = start(make_server, script=None).client().responses.create(
        model="thinking-byte-model", input="Think.", max_output_tokens=10)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert [(item.type, item.status) for item in r.output] == [("reasoning", "incomplete")]  # type: ignore[union-attr]
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens == 10


def test_reasoning_items_in_input_are_accepted(make_server) -> None:  # type: ignore[no-untyped-def]
    client = start(make_server).client()
    first = client.responses.create(model="thinking-byte-model", input="How many days?", text=TEXT_FORMAT)  # type: ignore[arg-type]
    replay = [item.model_dump(exclude_none=True) for item in first.output]
    r = client.responses.create(model="thinking-byte-model", text=TEXT_FORMAT,  # type: ignore[arg-type]
                                input=[{"role": "user", "content": "How many days?"}, *replay,  # type: ignore[list-item]
                                       {"role": "user", "content": "Again."}])
    assert r.output_text == '{"days":2}'


def test_smollm3_writes_code_in_code_tags_and_thinks_each_turn(make_server) -> None:  # type: ignore[no-untyped-def]
    model = ThinkingModel(turns=(b"<think>compute it</think>\n<code>print(6 * 7)</code>",
                                 b"<think>it printed 42</think>\nThe answer is 42."))
    server: Server = make_server(Engine(model))
    r = server.client().responses.create(model="thinking-byte-model", input="What is 6 times 7?",
                                         tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
                                         include=["code_interpreter_call.outputs"])
    assert [item.type for item in r.output] == ["reasoning", "code_interpreter_call", "reasoning", "message"]
    call = r.output[1]
    assert call.code == "print(6 * 7)"  # type: ignore[union-attr]
    assert call.outputs[0].logs.strip() == "42"  # type: ignore[union-attr,index]
    assert r.output_text == "The answer is 42."
    assert "Python code between <code> and </code>" in model.prompts[0]
    assert "<code>print(6 * 7)</code><|im_end|>" in model.prompts[1]  # the call, replayed in its own format
    assert "Output of the code:\n42" in model.prompts[1]
