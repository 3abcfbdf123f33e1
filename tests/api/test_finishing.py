"""A structured answer finishes, on the real bundled model through the openai SDK: a budget too small for the
schema's shortest document is a 400 naming it; a budget that cuts the answer closes it, valid; the repetition
breaker is a request field."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.model
MODEL = "smollm2-135m"
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "hobbies"], "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "hobbies": {"type": "array", "items": {"type": "string"},
                                                                        "minItems": 2}}}
CHAT_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
TEXT_FORMAT = {"format": {"type": "json_schema", "name": "person", "strict": True, "schema": PERSON}}
ASK = [{"role": "user", "content": "Describe a person with many hobbies as JSON."}]


def shortest(server: Server) -> int:
    """The 400 for a budget of one token, which names the shortest document's length."""
    with pytest.raises(openai.BadRequestError) as refused:
        server.client().chat.completions.create(model=MODEL, messages=ASK, response_format=CHAT_FORMAT,  # type: ignore[arg-type]
                                                max_tokens=1, temperature=0)
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "max_tokens" and error["type"] == "invalid_request_error"
    found = re.fullmatch(r"The shortest JSON document that the response format allows takes (\d+) tokens, but "
                         r"max_tokens is 1: raise max_tokens to at least \1\.", error["message"])
    assert found is not None, error["message"]
    return int(found.group(1))


def test_a_cut_answer_is_closed_valid_with_finish_reason_length(server: Server) -> None:
    minimum = shortest(server)
    assert 10 < minimum < 25  # {"name":"","age":0,"hobbies":["",""]} in SmolLM2's tokens
    for budget in (minimum, minimum + 6):
        completion = server.client().chat.completions.create(
            model=MODEL, messages=ASK, response_format=CHAT_FORMAT, max_tokens=budget, temperature=0,  # type: ignore[arg-type]
            extra_body={"dry_multiplier": 0})
        choice = completion.choices[0]
        assert choice.finish_reason == "length" and completion.usage is not None
        assert completion.usage.completion_tokens == budget
        jsonschema.validate(json.loads(choice.message.content or ""), PERSON)


def test_the_responses_api_names_max_output_tokens_and_closes_the_answer(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input=ASK[0]["content"], text=TEXT_FORMAT, max_output_tokens=1,  # type: ignore[arg-type]
                                temperature=0)
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "max_output_tokens"
    assert "raise max_output_tokens to at least" in error["message"]
    budget = shortest(server) + 4
    r = client.responses.create(model=MODEL, input=ASK[0]["content"], text=TEXT_FORMAT, max_output_tokens=budget,  # type: ignore[arg-type]
                                temperature=0, extra_body={"dry_multiplier": 0})
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    jsonschema.validate(json.loads(r.output_text), PERSON)


def test_the_breaker_field_is_checked_and_changes_the_answer(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, extra_body={"dry_multiplier": -1})  # type: ignore[arg-type]
    assert isinstance(refused.value.body, dict) and refused.value.body["param"] == "dry_multiplier"
    count = [{"role": "user", "content": "List the numbers 1 1 1 1 1 1 1 1 1 1 1 1"}]
    plain = client.chat.completions.create(model=MODEL, messages=count, max_tokens=40, temperature=0)  # type: ignore[arg-type]
    assert plain.choices[0].message.content == ", ".join(["1"] * 14)  # off for free text: the loop goes on
    broken = client.chat.completions.create(model=MODEL, messages=count, max_tokens=40, temperature=0,  # type: ignore[arg-type]
                                            extra_body={"dry_multiplier": 2.0})
    # The breaker acts at the third item, where the plain answer repeats: that choice has a wide margin. What
    # follows it is a near tie that machines with other SIMD paths break differently (12 or 2 after "11, ").
    text = broken.choices[0].message.content or ""
    assert text.startswith("1, 1, 11, ") and "1, 1, 1," not in text, text
