"""Chat Completions on the real bundled model through the official openai SDK."""

import json

import openai
import pytest
from pydantic import BaseModel

from tests.conftest import Server

pytestmark = pytest.mark.model
MODEL = "smollm2-135m"


class Person(BaseModel):
    name: str
    age: int
    hobbies: list[str]


def ask(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def test_parse_with_a_pydantic_model(server: Server) -> None:
    completion = server.client().chat.completions.parse(
        model=MODEL, messages=ask("Describe a person as JSON."), response_format=Person, max_tokens=200,
        temperature=0, frequency_penalty=0.5,
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Person)
    assert message.refusal is None
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_plain_text_and_streaming_give_the_same_greedy_text(server: Server) -> None:
    client = server.client()
    messages = ask("Name three colors.")
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and full.usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, full.usage.completion_tokens)
    assert usage.prompt_tokens_details is not None  # the same prompt again: all of it cached but its last token
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_helper_parses_structured_output(server: Server) -> None:
    with server.client().chat.completions.stream(
        model=MODEL, messages=ask("Describe a person as JSON."), response_format=Person, max_tokens=200,
        temperature=0, frequency_penalty=0.5,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)


def test_json_object_mode(server: Server) -> None:
    completion = server.client().chat.completions.create(
        model=MODEL, messages=ask("Reply in JSON with a greeting."), response_format={"type": "json_object"},
        max_tokens=300, temperature=0, frequency_penalty=1.0,  # greedy 135M output differs by CPU: room to end
    )
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)


def test_length_cut_makes_parse_raise_like_openai(server: Server) -> None:
    # Cut by the budget, the document is closed valid, yet finish_reason is "length", as the SDK expects.
    with pytest.raises(openai.LengthFinishReasonError) as cut:
        server.client().chat.completions.parse(
            model=MODEL, messages=ask("Describe a person."), response_format=Person, max_tokens=14, temperature=0
        )
    content = cut.value.completion.choices[0].message.content
    assert Person.model_validate_json(content or "")


def test_stop_sequence_ends_the_answer_before_it(server: Server) -> None:
    client = server.client()
    free = client.chat.completions.create(model=MODEL, messages=ask("Count from 1 to 10."), max_tokens=40,
                                          temperature=0).choices[0].message.content or ""
    assert len(free) > 4
    stop = free[2:4]
    cut = client.chat.completions.create(model=MODEL, messages=ask("Count from 1 to 10."), max_tokens=40,
                                         temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == free[: free.index(stop)]


def test_developer_role_and_content_parts(server: Server) -> None:
    completion = server.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Say hi."}]}],
        max_tokens=10,
    )
    assert completion.choices[0].message.content


def test_seed_makes_sampling_reproducible(server: Server) -> None:
    client = server.client()
    runs = [client.chat.completions.create(model=MODEL, messages=ask("Tell a story."), max_tokens=20,
                                           temperature=1.0, seed=7).choices[0].message.content for _ in range(2)]
    assert runs[0] == runs[1]


def test_unguaranteeable_schema_is_refused_with_its_path(server: Server) -> None:
    schema = {"type": "object", "properties": {"data": {"type": "array", "items": {"type": "string"},
                                                        "uniqueItems": True}},
              "required": ["data"], "additionalProperties": False}
    with pytest.raises(openai.BadRequestError) as err:
        server.client().chat.completions.create(
            model=MODEL, messages=ask("x"),
            response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": schema, "strict": True}},
        )
    body = err.value.body
    assert isinstance(body, dict)
    assert "In context=('properties', 'data'), 'uniqueItems' is not permitted" in body["message"]
    assert body["type"] == "invalid_request_error" and body["param"] == "response_format"
    assert body["code"] == "invalid_json_schema"


def test_strict_schema_must_follow_openai_rules(server: Server) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    with pytest.raises(openai.BadRequestError, match="additionalProperties"):
        server.client().chat.completions.create(
            model=MODEL, messages=ask("x"),
            response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": schema, "strict": True}},
        )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 5}, "temperature"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"max_tokens": 10_000_000}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
         "model"),  # the text model cannot see: the 400 names the model
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         "messages[0].content[0]"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_bad_requests_get_400_in_openai_shape(server: Server, extra: dict, param: str) -> None:
    body = {"model": MODEL, "messages": ask("x"), **extra}
    with pytest.raises(openai.BadRequestError) as err:
        server.client().chat.completions.create(**body)
    assert isinstance(err.value.body, dict)
    assert err.value.body["param"] == param
    assert err.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_404(server: Server) -> None:
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        server.client().chat.completions.create(model="gpt-4o", messages=ask("x"))


def test_models_endpoint(server: Server) -> None:
    client = server.client()
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "smolrun"
