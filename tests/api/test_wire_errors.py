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
