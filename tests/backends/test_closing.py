"""The closing search (backends/closing.py) on llguidance's byte tokenizer: from a grammar's start or from the
middle of a document, it writes a short valid end, whatever the schema wants there."""

from __future__ import annotations

import json
from typing import Any

import pytest
from llguidance import LLMatcher

from smolrun.backends.closing import (
    Closing,
    Vocabulary,
    pattern_example,
    pattern_literals,
    schema_hints,
    shortest_close,
)
from smolrun.constraints.grammar import JSON_OPTIONS
from tests.fakes import byte_tokenizer

TOKENIZER = byte_tokenizer()
VOCABULARY = Vocabulary.of(TOKENIZER)


def close(schema: dict[str, Any], written: bytes = b"") -> bytes | None:
    """The closing of `schema`'s document after `written` (the tokens are bytes)."""
    matcher = LLMatcher(TOKENIZER, "start: %json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}), log_level=0)
    closing = Closing(TOKENIZER, VOCABULARY, *schema_hints(schema))
    scan = closing.scan()
    for b in written:
        assert matcher.consume_token(b)
        scan.feed(bytes([b]))
    tokens = shortest_close(matcher, scan, closing)
    return None if tokens is None else TOKENIZER.decode_bytes(tokens)


RECORD = {"type": "object", "required": ["a", "b", "c"], "properties": {
    "a": {"type": "string", "minLength": 3}, "b": {"type": "integer", "minimum": 10},
    "c": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 2}}}


@pytest.mark.parametrize(("schema", "written", "end"), [
    (RECORD, b"", b'{"a":"aaa","b":10,"c":[1,1]}'),  # minLength, minimum, minItems, exclusiveMinimum
    (RECORD, b'{"a":"hel', b'","b":10,"c":[1,1]}'),  # inside a string that may end
    (RECORD, b'{"a":"h\xc3', b'\x80a","b":10,"c":[1,1]}'),  # inside a UTF-8 character, then minLength
    (RECORD, b'{"a":"hello","b":1', b'0,"c":[1,1]}'),  # a number below its minimum
    (RECORD, b'{"a":"hello","b":12,"c":[0.', b'1,1]}'),  # 0.0 is not above 0
    # The required key, not the optional ones the grammar allows before it; an enum's shortest value.
    ({"type": "object", "required": ["req"], "properties": {
        "opt": {"type": "string"}, "opt2": {"type": "boolean"}, "req": {"enum": ["red", "green"]}}},
     b"", b'{"req":"red"}'),
    # A required name no property lists: the key to write while extra properties are allowed.
    ({"type": "object", "required": ["x"], "additionalProperties": {"type": "integer"}}, b"", b'{"x":0}'),
    ({"type": "object", "required": ["d", "e"], "properties": {"d": {"type": "string", "format": "date"},
                                                               "e": {"type": "string", "format": "email"}}},
     b"", b'{"d":"0000-01-01","e":"A@a"}'),
    # Patterns that want their literal parts, which no one byte reaches.
    ({"type": "object", "required": ["p", "q"], "properties": {
        "p": {"type": "string", "pattern": "^file:.+\\.geodatabase?$"},
        "q": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]+$"}}}, b'{"p":"file:abc', b'.geodatabas","q":"AA-0"}'),
    ({"type": "string", "pattern": "data:image/png;base64,"}, b'"x', b'data:image/png;base64,"'),
    # An unanchored pattern not matched yet: its shortest match written after (a cut SKU, Github o10517).
    ({"type": "string", "pattern": "\\d{3}-[A-Z]{2}"}, b'"001,streetAddress:123Minnesota', b'000-AA"'),
    ({"type": "string", "pattern": "\\d{4}-\\d{2}-\\d{2} \\d{2}:\\d{2}"}, b'"2022-01-01T12:30:00Z,12',
     b'0000-00-00 00:00"'),
    # A key begun: the rest of a listed name, one not yet written first (Github o56016, o65310).
    ({"type": "object", "additionalProperties": False, "properties": {
        "tamperNotificationID": {"type": "integer"}, "tamperNotificationType": {"type": "integer"}}},
     b'{"tamperNotificationID":1,"tamperNot', b'ificationType":0}'),
    # A value begun: the rest of the enum's string it begins.
    ({"type": "object", "required": ["c"], "properties": {"c": {"enum": ["crimson", "cyan"]}}},
     b'{"c":"cr', b'imson"}'),
    ({"anyOf": [{"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]}, {"type": "null"}]},
     b"", b"null"),
])
def test_the_closing_is_short_and_valid(schema: dict[str, Any], written: bytes, end: bytes) -> None:
    assert close(schema, written) == end


def test_a_long_minimum_is_written_whole() -> None:
    schema = {"type": "array", "items": {"type": "string", "minLength": 2}, "minItems": 300}
    assert close(schema) == b"[" + b",".join([b'"aa"'] * 300) + b"]"


def test_code_or_calls_are_never_closed() -> None:
    closing = Closing(TOKENIZER, VOCABULARY, answer_only=False)
    grammar = 'start: code | answer\ncode: "```" /[a-z]*/ "```"\nanswer: %json {"type": "object"}\n'
    matcher = LLMatcher(TOKENIZER, grammar, log_level=0)
    scan = closing.scan()
    for b in b"``":
        assert matcher.consume_token(b)
        scan.feed(bytes([b]))
    assert scan.phase == "other"
    assert shortest_close(matcher, scan, closing) is None


def test_pattern_literals() -> None:
    assert pattern_literals("10\\..+/.+") == ["10.", "/"]
    assert pattern_literals("^file:.+\\.geodatabase?$") == ["file:", ".geodatabas"]
    assert pattern_literals("\\d{4}-[a-z]{2}x") == ["-", "x"]


def test_schema_hints_collect_required_names_and_pattern_texts() -> None:
    schema = {"required": ["a", "b"], "properties": {"a": {"pattern": "^ab+c$"}, "b": {
        "type": "object", "required": ["a", "c"]}}}
    assert schema_hints(schema) == ((b"a", b"b", b"c"), (b"a", b"c", b"abc"), (b"a", b"b"), ())
    assert schema_hints({"enum": ["x\"y", 1], "properties": {"k\u00e9": {"const": "z"}}}) == (
        (), (), ("k\u00e9".encode(),), (b'x\\"y', b"z"))


@pytest.mark.parametrize(("pattern", "example"), [
    ("\\d{4}-\\d{2}", "0000-00"), ("^[a-z]+(-[a-z]+)*$", "a"), ("^(https?|ftp)://[^\\s/$.?#].+$", "ftp://aa"),
    ("(ab|c)\\1", "cc"), ("[^abc]x", "0x"), ("^\\w{3,}$", "aaa"), ("(?<=a)b", None), ("[", None),
])
def test_pattern_example_is_a_short_match(pattern: str, example: str | None) -> None:
    assert pattern_example(pattern) == example
