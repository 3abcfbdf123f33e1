"""The Responses API and its code-interpreter loop: scripted turns for exact checks, the real model for
"whatever it writes, the call ends well-formed"."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from smolrun.engine import Engine
from tests.api.test_files_containers import needs_sandbox
from tests.conftest import Server
from tests.fakes import TurnsModel

CODE = {"type": "code_interpreter", "container": {"type": "auto"}}
OUTPUTS = ["code_interpreter_call.outputs"]


def ended_by(r: openai.types.responses.Response, budget: int) -> tuple[str, object]:
    """The status and incomplete_details a response must have, given the tokens it used: incomplete only when the
    output budget ran out (a natural end may also fall on the budget's last token)."""
    from openai.types.responses.response import IncompleteDetails

    assert r.usage is not None
    if r.status == "incomplete":
        assert r.usage.output_tokens == budget
        return "incomplete", IncompleteDetails(reason="max_output_tokens")
    assert r.usage.output_tokens <= budget
    return "completed", None


def scripted(make_server, *turns: bytes) -> tuple[Server, TurnsModel]:  # type: ignore[no-untyped-def]
    model = TurnsModel(*turns)
    return make_server(Engine(model)), model


@needs_sandbox
def test_code_call_then_answer(make_server) -> None:  # type: ignore[no-untyped-def]
    server, model = scripted(make_server, b"```python\nx = 6 * 7\nprint(x)\n```", b"The answer is 42.")
    r = server.client().responses.create(model="byte-model", input="6 times 7?", tools=[CODE], include=OUTPUTS)
    assert r.status == "completed" and [o.type for o in r.output] == ["code_interpreter_call", "message"]
    call = r.output[0]
    assert call.type == "code_interpreter_call" and call.code == "x = 6 * 7\nprint(x)"
    assert call.container_id.startswith("cntr_") and call.outputs and call.outputs[0].type == "logs"
    assert call.outputs[0].logs.strip() == "42"
    assert r.output_text == "The answer is 42."
    assert "Output of the code:\n42" in model.prompts[1]  # the observation went back to the model
    assert "```python" in model.prompts[0]  # and it was told how to call the tool
    assert r.usage is not None and r.usage.output_tokens > 0


@needs_sandbox
def test_tracebacks_are_observations_and_outputs_hidden_unless_included(make_server) -> None:  # type: ignore[no-untyped-def]
    server, model = scripted(make_server, b"```python\n1/0\n```", b"It failed.")
    r = server.client().responses.create(model="byte-model", input="x", tools=[CODE])
    assert r.status == "completed" and r.output[0].type == "code_interpreter_call"
    assert r.output[0].outputs is None
    assert "ZeroDivisionError" in model.prompts[1]


@needs_sandbox
def test_max_tool_calls_bounds_the_loop(make_server) -> None:  # type: ignore[no-untyped-def]
    server, model = scripted(make_server, b"```python\nprint(1)\n```")  # would call code forever
    r = server.client().responses.create(model="byte-model", input="x", tools=[CODE], max_tool_calls=2,
                                         max_output_tokens=300)
    kinds = [o.type for o in r.output]
    assert kinds[:2] == ["code_interpreter_call", "code_interpreter_call"] and "code_interpreter_call" not in kinds[2:]
    assert (r.status, r.usage.output_tokens) == ("completed", 66)  # type: ignore[union-attr]


@needs_sandbox
def test_files_created_by_code_are_cited_and_downloadable(make_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = scripted(make_server, b"```python\nopen('/mnt/data/report.txt', 'w').write('hi')\n```",
                         b"Saved report.txt for you.")
    client = server.client()
    r = client.responses.create(model="byte-model", input="x", tools=[CODE])
    message = r.output[-1]
    assert message.type == "message"
    note = message.content[0].annotations[0]  # type: ignore[union-attr]
    assert note.type == "container_file_citation" and note.filename == "report.txt"
    assert message.content[0].text[note.start_index:note.end_index] == "report.txt"  # type: ignore[union-attr]
    data = client.containers.files.content.retrieve(note.file_id, container_id=note.container_id).read()
    assert data == b"hi"


@needs_sandbox
def test_input_file_is_in_the_explicit_container(make_server) -> None:  # type: ignore[no-untyped-def]
    server, model = scripted(make_server, b"```python\nprint(open('/mnt/data/n.txt').read())\n```", b"Done.")
    client = server.client()
    upload = client.files.create(file=("n.txt", b"1234"), purpose="user_data")
    container = client.containers.create(name="c")
    r = client.responses.create(
        model="byte-model", tools=[{"type": "code_interpreter", "container": container.id}], include=OUTPUTS,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "read it"},
                                            {"type": "input_file", "file_id": upload.id}]}])
    assert r.output[0].type == "code_interpreter_call" and r.output[0].container_id == container.id
    assert r.output[0].outputs and r.output[0].outputs[0].logs.strip() == "1234"  # type: ignore[union-attr]
    assert "/mnt/data/n.txt" in model.prompts[0]


@needs_sandbox
def test_stream_events_pass_the_sdk_checks(make_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = scripted(make_server, b"```python\nprint(2 + 2)\n```", b"4")
    with server.client().responses.stream(model="byte-model", input="x", tools=[CODE]) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_response()
    assert events[:2] == ["response.created", "response.in_progress"] and events[-1] == "response.completed"
    expected = ["response.output_item.added", "response.code_interpreter_call.in_progress",
                "response.code_interpreter_call_code.done", "response.code_interpreter_call.interpreting",
                "response.code_interpreter_call.completed", "response.output_item.done",
                "response.content_part.added", "response.output_text.done", "response.content_part.done"]
    positions = [events.index(e) for e in expected]
    assert positions == sorted(positions)
    assert final.output_text == "4"


def test_stored_responses_chain_and_can_be_read_and_deleted(make_server) -> None:  # type: ignore[no-untyped-def]
    server, model = scripted(make_server, b"Hello Ada.", b"Your name is Ada.")
    client = server.client()
    first = client.responses.create(model="byte-model", input="My name is Ada.", instructions="Be kind.")
    second = client.responses.create(model="byte-model", input="What is my name?", previous_response_id=first.id)
    assert "My name is Ada." in model.prompts[1] and "Hello Ada." in model.prompts[1]
    assert "Be kind." not in model.prompts[1]  # instructions are not carried over, as at OpenAI
    assert client.responses.retrieve(first.id).output_text == "Hello Ada."
    items = client.responses.input_items.list(second.id)
    assert [i.type for i in items] == ["message"]
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    unstored = client.responses.create(model="byte-model", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize(
    ("extra", "param", "status"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0]", 400),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
         "model", 400),  # the text model cannot see: the 400 names the model
        ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input[0].content[0]", 400),
        ({"text": {"format": {"type": "json_schema", "name": "x", "strict": True,
                              "schema": {"type": "object", "properties": {"a": {"not": {}}}, "required": ["a"],
                                         "additionalProperties": False}}}}, "text.format.schema", 400),
        ({"tools": [{"type": "code_interpreter", "container": "cntr_missing"}]}, "container_id", 404),
        ({"previous_response_id": "resp_missing"}, "response_id", 404),
    ],
)
def test_bad_requests(make_server, extra: dict, param: str, status: int) -> None:  # type: ignore[no-untyped-def]
    server, _ = scripted(make_server, b"x")
    with pytest.raises(openai.APIStatusError) as err:
        server.client().responses.create(**{"model": "byte-model", "input": "x", **extra})
    assert err.value.status_code == status
    assert isinstance(err.value.body, dict) and err.value.body["param"] == param


# -- the real bundled model ---------------------------------------------------------------------------------

class Answer(BaseModel):
    answer: int


@pytest.mark.model
@needs_sandbox
def test_real_model_with_code_interpreter_ends_well_formed(server: Server) -> None:
    client = server.client()
    r = client.responses.create(model="smollm2-135m", input="What is 17 * 23? Use Python.", tools=[CODE],
                                include=OUTPUTS, max_output_tokens=300, temperature=0)
    assert r.output and (r.status, r.incomplete_details) == ended_by(r, 300)
    with client.responses.stream(model="smollm2-135m", input="Compute 2**10 with Python.", tools=[CODE],
                                 max_output_tokens=300, temperature=0) as stream:
        events = list(stream)  # the SDK's stream checks (order, identities) run on every event
    # A 135M model may use the whole budget: then the stream ends with response.incomplete, like OpenAI's.
    last = events[-1].response  # type: ignore[union-attr]
    assert events[-1].type == f"response.{ended_by(last, 300)[0]}"


@pytest.mark.model
@needs_sandbox
def test_real_model_code_interpreter_with_strict_format_validates(server: Server) -> None:
    client = server.client()
    parsed = client.responses.parse(model="smollm2-135m", input="What is 6 * 7?", tools=[CODE], text_format=Answer,
                                    max_output_tokens=400, temperature=0)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Answer)
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    r = client.responses.create(model="smollm2-135m", input="What is the population of Paris?", tools=[CODE],
                                temperature=0,
                                max_output_tokens=800, max_tool_calls=1,
                                text={"format": {"type": "json_schema", "name": "city", "schema": schema,
                                                 "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)


WEATHER_FN = {"type": "function", "name": "get_weather", "description": "Weather for a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                             "additionalProperties": False}, "strict": True}
CALL = b'<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'


def test_function_tool_round_trip_with_previous_response_id(make_server) -> None:  # type: ignore[no-untyped-def]
    server, model = scripted(make_server, CALL, b"Sunny in Paris.")
    client = server.client()
    first = client.responses.create(model="byte-model", input="Weather in Paris?", tools=[WEATHER_FN])
    assert first.status == "completed" and [o.type for o in first.output] == ["function_call"]
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    second = client.responses.create(model="byte-model", previous_response_id=first.id, tools=[WEATHER_FN],
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": '{"sky": "sunny"}'}])
    assert second.output_text == "Sunny in Paris."
    assert "<tool_response>\n{\"sky\": \"sunny\"}\n</tool_response>" in model.prompts[1]
    assert '"arguments": {"city": "Paris"}' in model.prompts[1]


def test_function_calls_stream_and_mix_with_the_code_interpreter(make_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = scripted(make_server, CALL)
    with server.client().responses.stream(model="byte-model", input="x", tools=[WEATHER_FN, CODE]) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in events and "response.function_call_arguments.done" in events
    assert [o.type for o in final.output] == ["function_call"]


def test_two_calls_stream_their_arguments_as_generated_one_item_after_the_other(make_server) -> None:  # type: ignore[no-untyped-def]
    second = CALL.replace(b"Paris", b"Lyon")
    server, _ = scripted(make_server, CALL + b"\n" + second)
    with server.client().responses.stream(model="byte-model", input="x", tools=[WEATHER_FN]) as stream:
        events = list(stream)  # the SDK checks each event against what it has accumulated
        final = stream.get_final_response()
    deltas: dict[int, list[str]] = {}
    for e in events:
        if e.type == "response.function_call_arguments.delta":
            deltas.setdefault(e.output_index, []).append(e.delta)
    assert {i: "".join(d) for i, d in deltas.items()} == {0: '{"city":"Paris"}', 1: '{"city":"Lyon"}'}
    assert min(len(d) for d in deltas.values()) > 3  # streamed as generated, not in one piece at the end
    order = [(e.type, e.output_index) for e in events if e.type.startswith("response.output_item.")]
    assert order == [("response.output_item.added", 0), ("response.output_item.done", 0),
                     ("response.output_item.added", 1), ("response.output_item.done", 1)]
    assert [(o.name, o.arguments, o.status) for o in final.output] == [  # type: ignore[union-attr]
        ("get_weather", '{"city":"Paris"}', "completed"), ("get_weather", '{"city":"Lyon"}', "completed")]


def test_function_tool_choice_none_and_bad_schemas(make_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = scripted(make_server, CALL)
    client = server.client()
    r = client.responses.create(model="byte-model", input="x", tools=[WEATHER_FN], tool_choice="none",
                                max_output_tokens=80)
    assert all(o.type != "function_call" for o in r.output)
    loose = {**WEATHER_FN, "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    with pytest.raises(openai.BadRequestError) as err:  # strict by default in the Responses API
        client.responses.create(model="byte-model", input="x", tools=[loose])
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "tools[0].parameters"
    # `strict` left out (langchain's bind_tools): a schema outside strict mode's rules is taken as not strict,
    # and its arguments still follow it.
    unsaid = {k: v for k, v in loose.items() if k != "strict"}
    called = client.responses.create(model="byte-model", input="x", tools=[unsaid], tool_choice="required")
    assert [(o.type, o.name, o.arguments) for o in called.output] == [  # type: ignore[union-attr]
        ("function_call", "get_weather", '{"city":"Paris"}')]


@pytest.mark.model
def test_real_model_function_round_trip(server: Server) -> None:
    client = server.client()
    first = client.responses.create(model="smollm2-135m", input="What is the weather in Paris?",
                                    tools=[WEATHER_FN], tool_choice="required", temperature=0,
                                    max_output_tokens=150, extra_body={"frequency_penalty": 0.5})
    calls = [o for o in first.output if o.type == "function_call"]
    assert first.status == "completed" and calls  # required: always a call
    args = json.loads(calls[0].arguments)
    jsonschema.validate(args, WEATHER_FN["parameters"])
    second = client.responses.create(model="smollm2-135m", previous_response_id=first.id, tools=[WEATHER_FN],
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": '{"sky": "sunny", "celsius": 21}'}],
                                     temperature=0, max_output_tokens=150, extra_body={"frequency_penalty": 0.5})
    assert second.output and (second.status, second.incomplete_details) == ended_by(second, 150)


@needs_sandbox
@pytest.mark.parametrize("choice", ["required", {"type": "code_interpreter"}])
def test_a_required_code_interpreter_runs_code_first(make_server, choice: object) -> None:  # type: ignore[no-untyped-def]
    server, _ = scripted(make_server, b"```python\nprint(6 * 7)\n```", b"It is 42.")
    r = server.client().responses.create(model="byte-model", input="6 times 7?", tools=[CODE], include=OUTPUTS,
                                         tool_choice=choice)  # type: ignore[arg-type]
    assert [o.type for o in r.output] == ["code_interpreter_call", "message"]
    assert r.output_text == "It is 42."
