"""Function calling in Chat Completions: grammar-enforced calls, tool_choice, round trips, streaming."""

from __future__ import annotations

import json

import openai
import pytest
from openai import pydantic_function_tool
from pydantic import BaseModel

from smolrun.engine import Engine
from tests.conftest import Server
from tests.fakes import TurnsModel


class GetWeather(BaseModel):
    city: str
    days: int


WEATHER = pydantic_function_tool(GetWeather)
NOTE = {"type": "function", "function": {"name": "note", "parameters": {"type": "object", "properties": {
    "text": {"type": "string"}}, "required": ["text"], "additionalProperties": False}, "strict": True}}
ASK = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]


def scripted(make_server, *turns: bytes) -> tuple[Server, TurnsModel]:  # type: ignore[no-untyped-def]
    model = TurnsModel(*turns)
    return make_server(Engine(model)), model


TWO_CALLS = (b'<tool_call>{"name":"GetWeather","arguments":{"city":"Paris","days":3}}</tool_call>\n'
             b'<tool_call>{"name":"note","arguments":{"text":"hi"}}</tool_call>')


def test_calls_come_back_as_tool_calls(make_server) -> None:  # type: ignore[no-untyped-def]
    server, model = scripted(make_server, TWO_CALLS)
    r = server.client().chat.completions.create(model="byte-model", messages=ASK, tools=[WEATHER, NOTE])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("GetWeather", {"city": "Paris", "days": 3}), ("note", {"text": "hi"})]
    assert len({c.id for c in calls}) == 2
    assert '"name": "GetWeather"' in model.prompts[0]  # the functions are described to the model


def test_parallel_tool_calls_false_allows_one_call(make_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = scripted(make_server, TWO_CALLS)
    r = server.client().chat.completions.create(model="byte-model", messages=ASK, tools=[WEATHER, NOTE],
                                                parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls or []) == 1


def test_tool_choice_none_never_calls(make_server) -> None:  # type: ignore[no-untyped-def]
    server, model = scripted(make_server, TWO_CALLS)
    r = server.client().chat.completions.create(model="byte-model", messages=ASK, tools=[WEATHER],
                                                tool_choice="none", max_tokens=50)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"
    assert "GetWeather" not in model.prompts[0]


def test_named_tool_choice_forces_that_function(make_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = scripted(make_server, TWO_CALLS)  # the model wants GetWeather first; the grammar says note
    r = server.client().chat.completions.create(model="byte-model", messages=ASK, tools=[WEATHER, NOTE],
                                                tool_choice={"type": "function", "function": {"name": "note"}},
                                                max_tokens=200)
    calls = r.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["note"]  # type: ignore[union-attr]


def test_round_trip_renders_calls_and_results(make_server) -> None:  # type: ignore[no-untyped-def]
    server, model = scripted(make_server, b"It is sunny.")
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "GetWeather",
                                                          "arguments": '{"city":"Paris","days":3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'}]
    r = server.client().chat.completions.create(model="byte-model", messages=messages, tools=[WEATHER])
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].finish_reason == "stop"
    call = '<tool_call>{"name": "GetWeather", "arguments": {"city": "Paris", "days": 3}}</tool_call>'
    assert call in model.prompts[0]
    assert '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in model.prompts[0]


def test_streamed_calls_merge_in_the_sdk(make_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = scripted(make_server, TWO_CALLS.split(b"\n")[0])
    with server.client().chat.completions.stream(model="byte-model", messages=ASK, tools=[WEATHER]) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls"
    assert [c.function.parsed_arguments for c in calls] == [GetWeather(city="Paris", days=3)]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
            "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}}]},
         "tools[0].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "a": {"$ref": "https://example.com/a.json"}}}}}]}, "tools[0].function.parameters"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ],
)
def test_bad_tool_requests(make_server, extra: dict, param: str) -> None:  # type: ignore[no-untyped-def]
    server, _ = scripted(make_server, b"x")
    with pytest.raises(openai.BadRequestError) as err:
        server.client().chat.completions.create(**{"model": "byte-model", "messages": ASK, **extra})
    assert isinstance(err.value.body, dict) and err.value.body["param"] == param


# -- the real bundled model ---------------------------------------------------------------------------------

REAL = {"model": "smollm2-135m", "temperature": 0, "max_tokens": 150, "frequency_penalty": 0.5}


@pytest.mark.model
def test_real_model_strict_tool_arguments_validate(server: Server) -> None:
    client = server.client()
    for question in ("What's the weather in Paris for 3 days?", "Rome, next week?", "Tell me a joke."):
        r = client.chat.completions.parse(messages=[{"role": "user", "content": question}], tools=[WEATHER],
                                          tool_choice="required", **REAL)
        calls = r.choices[0].message.tool_calls or []
        assert r.choices[0].finish_reason == "tool_calls" and calls  # required: always a call
        assert all(isinstance(c.function.parsed_arguments, GetWeather) for c in calls)


@pytest.mark.model
def test_real_model_round_trip_and_none(server: Server) -> None:
    client = server.client()
    first = client.chat.completions.parse(messages=ASK, tools=[WEATHER], tool_choice="required", **REAL)
    call = (first.choices[0].message.tool_calls or [])[0]
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny, 21 C"}'}]
    second = client.chat.completions.create(messages=messages, tools=[WEATHER], **REAL)
    choice, usage = second.choices[0], second.usage
    assert usage is not None and usage.completion_tokens <= REAL["max_tokens"]
    # The finish reason the answer implies: the budget spent, else calls, else a natural stop (which may also
    # fall on the budget's last token).
    if choice.finish_reason == "length":
        assert usage.completion_tokens == REAL["max_tokens"]
    else:
        assert choice.finish_reason == ("tool_calls" if choice.message.tool_calls else "stop")
    never = client.chat.completions.create(messages=ASK, tools=[WEATHER], tool_choice="none", **REAL)
    assert never.choices[0].message.tool_calls is None


PICK = {"type": "function", "function": {"name": "pick", "strict": True, "parameters": {
    "type": "object", "properties": {"v": {"type": "string", "enum": ["a</tool_call>b", "c"]}}, "required": ["v"],
    "additionalProperties": False}}}
TAGGED = b'<tool_call>{"name":"pick","arguments":{"v":"a</tool_call>b"}}</tool_call>'


def test_a_closing_tag_inside_an_argument_is_only_a_string(make_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = scripted(make_server, TAGGED)
    client = server.client()
    r = client.chat.completions.create(model="byte-model", messages=ASK, tools=[PICK], tool_choice="required")  # type: ignore[list-item]
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and calls is not None
    assert [(c.function.name, c.function.arguments) for c in calls] == [("pick", '{"v":"a</tool_call>b"}')]  # type: ignore[union-attr]
    out = client.responses.create(model="byte-model", input="x", tool_choice="required",
                                  tools=[{"type": "function", **PICK["function"]}])  # type: ignore[list-item, dict-item]
    assert [(o.type, o.arguments) for o in out.output] == [("function_call", '{"v":"a</tool_call>b"}')]  # type: ignore[union-attr]


CUT = (b'<tool_call>{"name":"GetWeather","arguments":{"city":"Paris","days":3}}</tool_call>\n'
       b'<tool_call>{"name":"note","arguments":{"text":"a long note"}}</tool_call>')


def test_calls_cut_by_max_tokens_come_back_as_calls_never_markup(make_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = scripted(make_server, CUT)
    client = server.client()
    budget = CUT.index(b"long") + 2  # one byte a token: the second call stops inside its text
    r = client.chat.completions.create(model="byte-model", messages=ASK, tools=[WEATHER, NOTE], max_tokens=budget)
    choice = r.choices[0]
    assert (choice.finish_reason, choice.message.content) == ("length", None)
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()] == [  # type: ignore[union-attr]
        ("GetWeather", '{"city":"Paris","days":3}'), ("note", '{"text":"a lo')]
    stream = client.chat.completions.create(model="byte-model", messages=ASK, tools=[WEATHER, NOTE],
                                            max_tokens=budget, stream=True)
    chunks = list(stream)
    contents = [c.choices[0].delta.content for c in chunks if c.choices]
    assert [c for c in contents if c is not None] == [""]  # only the opening role chunk carries content, empty
    pieces: dict[int, list[str]] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or ():
            pieces.setdefault(delta.index, []).append(delta.function.arguments or "")  # type: ignore[union-attr]
    assert {i: "".join(p) for i, p in pieces.items()} == {0: '{"city":"Paris","days":3}', 1: '{"text":"a lo'}
    assert len(pieces[0]) > 3  # the arguments stream as they are generated, not in one piece at the end
    assert chunks[-1].choices[0].finish_reason == "length"
    out = client.responses.create(model="byte-model", input="x", max_output_tokens=budget,
                                  tools=[{"type": "function", **t["function"], "strict": True}  # type: ignore[dict-item]
                                         for t in (WEATHER, NOTE)])
    assert (out.status, out.incomplete_details.reason) == ("incomplete", "max_output_tokens")  # type: ignore[union-attr]
    assert [(o.name, o.arguments, o.status) for o in out.output] == [  # type: ignore[union-attr]
        ("GetWeather", '{"city":"Paris","days":3}', "completed"), ("note", '{"text":"a lo', "incomplete")]


def test_calls_per_turn_are_bounded(make_server) -> None:  # type: ignore[no-untyped-def]
    call = b'<tool_call>{"name":"note","arguments":{"text":"hi"}}</tool_call>'
    server, _ = scripted(make_server, b"\n".join([call] * 12))
    r = server.client().chat.completions.create(model="byte-model", messages=ASK, tools=[NOTE], max_tokens=2000)
    assert (r.choices[0].finish_reason, len(r.choices[0].message.tool_calls or ())) == ("tool_calls", 8)
