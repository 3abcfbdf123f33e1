"""Malformed bodies are a 400 in OpenAI's shape that names the parameter, never a 500 (issue 14, item 5)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from smolrun.engine import Engine
from tests.fakes import TurnsModel

MESSAGES = [{"role": "user", "content": "hi"}]
FN = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
RESPONSES_FN = {"type": "function", "name": "f", "strict": False, "parameters": {"type": "object", "properties": {}}}


def _deep(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


CASES = [
    ("chat/completions", {"messages": MESSAGES, "tools": [FN], "tool_choice": {"type": "function", "function": "f"}},
     "tool_choice"),
    ("chat/completions", {"messages": MESSAGES, "tools": [FN],
                          "tool_choice": {"type": "function", "function": {"name": ["f"]}}}, "tool_choice"),
    ("chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
        "name": "deep", "schema": _deep(300)}}}, "response_format"),
    ("chat/completions", {"messages": MESSAGES, "seed": 2**64}, "seed"),
    ("responses", {"input": "hi", "text": {"format": "json"}}, "text.format"),
    ("responses", {"input": "hi", "tools": [RESPONSES_FN], "tool_choice": {"type": "function", "name": ["f"]}},
     "tool_choice"),
    ("responses", {"input": [{"type": "code_interpreter_call", "id": "ci_1", "code": "1", "outputs": "abc"}]},
     "input[0].outputs"),
]


@pytest.mark.parametrize(("route", "body", "param"), CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_malformed_bodies_are_400_naming_the_parameter(make_server, route: str, body: dict[str, Any],  # type: ignore[no-untyped-def]
                                                       param: str) -> None:
    server = make_server(Engine(TurnsModel(b"ok")))
    reply = httpx.post(f"{server.url}/{route}", json={"model": "byte-model", **body}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error


def test_a_negative_seed_is_accepted_as_at_openai(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(TurnsModel(b"ok")))
    reply = server.client().chat.completions.create(model="byte-model", messages=MESSAGES, seed=-1)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "ok"


@pytest.mark.parametrize(("route", "body", "param"), [
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}] * 2049}, "messages"),
    ("responses", {"input": [{"role": "user", "content": "x"}] * 2049}, "input"),
])
def test_more_than_2048_messages_are_refused_before_any_work(make_server, route: str, body: dict[str, Any],  # type: ignore[no-untyped-def]
                                                             param: str) -> None:
    server = make_server(Engine(TurnsModel(b"ok")))
    reply = httpx.post(f"{server.url}/{route}", json={"model": "byte-model", **body}, timeout=30)
    assert (reply.status_code, reply.json()["error"]["param"]) == (400, param)


def test_a_body_over_the_limit_is_413_declared_or_streamed(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(TurnsModel(b"ok")), max_body_mb=1)
    big = {"model": "byte-model", "messages": [{"role": "user", "content": "x" * (1024 * 1024)}]}
    declared = httpx.post(f"{server.url}/chat/completions", json=big, timeout=30)
    assert (declared.status_code, declared.json()["error"]["code"]) == (413, "request_too_large")

    def chunks():  # type: ignore[no-untyped-def]  # no Content-Length: the limit counts what arrives
        data = json.dumps(big).encode()
        for at in range(0, len(data), 65536):
            yield data[at:at + 65536]

    streamed = httpx.post(f"{server.url}/chat/completions", content=chunks(), timeout=30,
                          headers={"content-type": "application/json"})
    assert (streamed.status_code, streamed.json()["error"]["code"]) == (413, "request_too_large")
    small = server.client().chat.completions.create(model="byte-model", messages=MESSAGES)  # type: ignore[arg-type]
    assert small.choices[0].message.content == "ok"


# OpenAI types these parameters strictly: no coercion of `true` to a number or of "123" to an integer.
WRONG_TYPES = [
    ("chat/completions", {"temperature": True}, "temperature"),
    ("chat/completions", {"temperature": "0.5"}, "temperature"),
    ("chat/completions", {"max_tokens": "123"}, "max_tokens"),
    ("chat/completions", {"max_tokens": 12.5}, "max_tokens"),
    ("chat/completions", {"top_p": [1]}, "top_p"),
    ("chat/completions", {"stop": {"a": 1}}, "stop"),
    ("chat/completions", {"stop": 7}, "stop"),
    ("chat/completions", {"stream": "true"}, "stream"),
    ("chat/completions", {"stream": 1}, "stream"),
    ("chat/completions", {"seed": "1"}, "seed"),
    ("chat/completions", {"parallel_tool_calls": 0}, "parallel_tool_calls"),
    ("chat/completions", {"messages": {"role": "user", "content": "hi"}}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("chat/completions", {"response_format": None}, "response_format"),
    ("chat/completions", {"tools": None}, "tools"),
    ("chat/completions", {"tool_choice": None}, "tool_choice"),
    ("chat/completions", {"parallel_tool_calls": None}, "parallel_tool_calls"),
    ("responses", {"temperature": False}, "temperature"),
    ("responses", {"max_output_tokens": "50"}, "max_output_tokens"),
    ("responses", {"store": "yes"}, "store"),
    ("responses", {"input": 42}, "input"),
    ("responses", {"instructions": ["be brief"]}, "instructions"),
    ("responses", {"text": None}, "text"),
    ("responses", {"tools": None}, "tools"),
    ("responses", {"tool_choice": None}, "tool_choice"),
]


@pytest.mark.parametrize(("route", "body", "param"), WRONG_TYPES,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(WRONG_TYPES)])
def test_wrong_types_and_nulls_where_openai_allows_none_are_400(make_server, route: str,  # type: ignore[no-untyped-def]
                                                                body: dict[str, Any], param: str) -> None:
    server = make_server(Engine(TurnsModel(b"ok")))
    base = {"messages": MESSAGES} if route == "chat/completions" else {"input": "hi"}
    reply = httpx.post(f"{server.url}/{route}", json={"model": "byte-model", **base, **body}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error


# Null where OpenAI's spec marks the parameter nullable is its default; an integer where a number goes is a number.
NULLABLE = {
    "chat/completions": {"temperature": None, "top_p": None, "stop": None, "max_tokens": None, "seed": None,
                         "max_completion_tokens": None, "n": None, "frequency_penalty": None, "presence_penalty": None,
                         "stream": None, "stream_options": None, "logprobs": None, "reasoning_effort": None},
    "responses": {"temperature": None, "top_p": None, "max_output_tokens": None, "instructions": None,
                  "previous_response_id": None, "store": None, "metadata": None, "parallel_tool_calls": None,
                  "reasoning": None, "include": None, "max_tool_calls": None, "stream": None},
}


@pytest.mark.parametrize("route", list(NULLABLE))
def test_nulls_where_openai_allows_them_and_integers_as_numbers_are_accepted(make_server, route: str) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(TurnsModel(b"ok")))
    base = {"messages": MESSAGES} if route == "chat/completions" else {"input": "hi"}
    reply = httpx.post(f"{server.url}/{route}", timeout=30,
                       json={"model": "byte-model", **base, **NULLABLE[route], "temperature": 1, "top_p": 1})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    text = (body["choices"][0]["message"]["content"] if route == "chat/completions"
            else body["output"][-1]["content"][0]["text"])
    assert text == "ok"
