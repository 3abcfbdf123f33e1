"""Keywords llguidance does not compile, rewritten: each one's grammar takes exactly the documents it should."""

import json
import logging

import jsonschema
import pytest

from smolrun.backends.decode import decode
from smolrun.constraints import check_schema
from smolrun.constraints.grammar import GrammarCache
from smolrun.constraints.rewrite import rewrite
from smolrun.errors import SchemaError
from smolrun.turn import Done, ResponseFormat, SamplingParams, TextDelta
from tests.constraints.test_grammar import accepts
from tests.fakes import ByteModel, byte_tokenizer

DRAFT4 = "http://json-schema.org/draft-04/schema#"
DRAFT7 = "http://json-schema.org/draft-07/schema#"
I, S = {"type": "integer"}, {"type": "string"}  # noqa: E741


def source(schema: dict) -> str:
    grammar = GrammarCache(byte_tokenizer()).get(ResponseFormat("json_schema", check_schema(schema, strict=False,
                                                                                           what="x")))
    assert grammar is not None
    return grammar.source


def check(schema: dict, valid: list[str], invalid: list[str], narrowed: list[str] = ()) -> None:
    """`valid` are taken, `invalid` refused (and invalid indeed), `narrowed` refused though valid (a documented
    approximation)."""
    grammar = source(schema)
    cls = jsonschema.validators.validator_for(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    for text in valid:
        assert validator.is_valid(json.loads(text)), text
        assert accepts(grammar, text), text
    for text in invalid:
        assert not validator.is_valid(json.loads(text)), text
        assert not accepts(grammar, text), text
    for text in narrowed:
        assert validator.is_valid(json.loads(text)), text
        assert not accepts(grammar, text), text


def refused(schema: dict, context: str, keyword: str) -> None:
    with pytest.raises(SchemaError) as err:
        check_schema(schema, strict=False, what="response_format 'x'")
    assert err.value.message.startswith(f"Invalid schema for response_format 'x': In context={context}, ")
    assert keyword in err.value.message


TAGGED = {"oneOf": [
    {"type": "object", "properties": {"kind": {"const": "a"}, "x": I}, "required": ["kind"]},
    {"type": "object", "properties": {"kind": {"enum": ["b"]}, "y": S}, "required": ["kind"]}]}
PETS = {"type": "object", "oneOf": [{"properties": {"dog": S}}, {"properties": {"cat": S}}]}
COORDINATES = {"oneOf": [{"type": "array", "items": {"type": "number"}},
                         {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}]}
DEPENDENCIES = {"$schema": DRAFT7, "type": "object", "properties": {"a": I, "b": I, "c": I},
                "dependencies": {"a": ["b"], "c": {"required": ["a"]}}}
DEPENDENT = {"type": "object", "properties": {"a": I, "b": I, "c": I},
             "dependentRequired": {"a": ["b"]}, "dependentSchemas": {"c": {"properties": {"a": {"minimum": 5}}}}}
CONDITIONAL = {"type": "object", "properties": {"kind": {"enum": ["x", "y"]}, "n": I}, "required": ["kind"],
               "if": {"properties": {"kind": {"const": "x"}}}, "then": {"required": ["n"]},
               "else": {"properties": {"n": False}}}
NOT_REQUIRED = {"type": "object", "properties": {"a": I, "b": I}, "not": {"required": ["a", "b"]}}
NOT_ENUM = {"type": "string", "not": {"enum": ["upstart", "x"]}}
NOT_TYPE = {"not": {"type": ["number", "object", "array"]}}
NOT_CHARS = {"type": "string", "minLength": 1, "not": {"pattern": "^[.,*]+$"}}
UNIQUE_ENUM = {"type": "array", "items": {"enum": ["a", "b"]}, "uniqueItems": True}
UNIQUE_OPEN = {"type": "array", "items": S, "uniqueItems": True}
MIN_PROPERTIES = {"type": "object", "properties": {"a": I, "b": I, "c": I}, "additionalProperties": False,
                  "minProperties": 2}
MAX_PROPERTIES = {"type": "object", "properties": {"a": I}, "additionalProperties": I, "maxProperties": 1}
SWITCH = {"type": "object", "properties": {"t": {"enum": ["a", "b", "c"]}, "n": I}, "required": ["t"],
          "allOf": [{"if": {"properties": {"t": {"const": v}}}, "then": {"properties": {"n": {"const": i}}}}
                    for i, v in enumerate("abc")]}


def test_one_of_with_a_tag_is_any_of() -> None:
    check(TAGGED, ['{"kind":"a","x":1}', '{"kind":"b","y":"s"}'], ['{"kind":"c"}', '{"kind":"a","x":"s"}'])
    assert "oneOf" not in json.dumps(rewrite(TAGGED).schema)


def test_overlapping_one_of_takes_values_matching_exactly_one_branch() -> None:
    check(PETS, ['{"dog":"x","cat":1}', '{"cat":"y","dog":1}'], ['{}', '{"dog":"x"}', '{"dog":"x","cat":"y"}'])
    check(COORDINATES, ["[1]", "[[1,2]]"], ["[]", '["a"]'])


def test_one_of_that_cannot_be_made_exclusive_is_refused() -> None:
    refused({"type": "object", "properties": {"role": {"oneOf": [{"pattern": "A"}, {"pattern": "B"}]}}},
            "('properties', 'role')", "'oneOf' branches 0 and 1 may both match")


def test_dependencies_both_forms_and_their_2019_names() -> None:
    check(DEPENDENCIES, ["{}", '{"b":1}', '{"a":1,"b":2}', '{"a":1,"b":2,"c":3}'], ['{"a":1}', '{"b":2,"c":3}'])
    check(DEPENDENT, ["{}", '{"a":1,"b":2}', '{"a":5,"b":1,"c":3}'], ['{"a":1}', '{"a":1,"b":1,"c":3}'])


def test_if_then_else_on_a_const() -> None:
    check(CONDITIONAL, ['{"kind":"x","n":1}', '{"kind":"y"}'], ['{"kind":"x"}', '{"kind":"y","n":1}'])


def test_if_then_on_one_tag_is_one_alternative_per_value() -> None:
    check(SWITCH, ['{"t":"a","n":0}', '{"t":"c","n":2}', '{"t":"b"}'], ['{"t":"a","n":1}', '{"t":"c","n":0}'])


@pytest.mark.parametrize(("schema", "valid", "invalid"), [
    (NOT_REQUIRED, ['{"a":1}', "{}", '{"b":2}'], ['{"a":1,"b":2}']),
    (NOT_ENUM, ['"ups"', '"upstarts"', '""', '"y"'], ['"upstart"', '"x"']),
    (NOT_TYPE, ['"s"', "null", "true"], ["1", "1.5", "[]", "{}"]),
    (NOT_CHARS, ['"a."', '"Mr. X"'], ['"..."', '"*"', '""']),
    ({"type": "integer", "not": {"minimum": 3, "maximum": 5}}, ["2", "6"], ["3", "5"]),
    ({"properties": {"x": {"not": {}}}, "type": "object"}, ["{}"], ['{"x":1}']),
], ids=["required", "enum", "type", "character-class", "range", "nothing"])
def test_not(schema: dict, valid: list[str], invalid: list[str]) -> None:
    check(schema, valid, invalid)


def test_not_without_a_complement_is_refused() -> None:
    refused({"type": "object", "properties": {"e": {"type": "string", "not": {"format": "email"}}}},
            "('properties', 'e')", "'not'")


def test_unique_items() -> None:
    check({"type": "array", "items": {"const": 1}, "uniqueItems": True}, ["[]", "[1]"], ["[1,1]"])
    check({"type": "array", "items": S, "uniqueItems": True, "maxItems": 1}, ["[]", '["x"]'], ['["x","x"]'])
    check(UNIQUE_ENUM, ["[]", '["a"]', '["b"]', '["a","b"]'], ['["a","a"]', '["b","b","a"]'], narrowed=['["b","a"]'])
    check(UNIQUE_OPEN, ["[]", '["x"]'], ['["x","x"]'], narrowed=['["x","y"]'])
    refused({"type": "object", "properties": {"t": {"type": "array", "items": S, "uniqueItems": True,
                                                   "minItems": 2}}}, "('properties', 't')", "'uniqueItems'")


def test_min_and_max_properties_with_optional_keys() -> None:
    check(MIN_PROPERTIES, ['{"a":1,"b":2}', '{"a":1,"c":3}', '{"a":1,"b":2,"c":3}'], ["{}", '{"b":1}'])
    check(MAX_PROPERTIES, ["{}", '{"a":1}', '{"z":1}'], ['{"a":1,"z":2}', '{"y":1,"z":2}'])


def test_formats_known_enforced_unknown_accepted_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    check({"type": "string", "format": "json-pointer"}, ['"/a/b~0"', '""'], ['"a"', '"/~2"'])
    check({"type": "string", "format": "uuid"}, ['"123e4567-e89b-12d3-a456-426614174000"'], ['"x"'])
    schema = {"type": "object", "properties": {"n": {"type": "integer", "format": "int32"},
                                               "c": {"type": "string", "format": "color"}}}
    with caplog.at_level(logging.WARNING, logger="smolrun"):
        checked = check_schema(schema, strict=False, what="x")
    assert "format 'int32'" in caplog.text and "format 'color'" in caplog.text
    grammar = GrammarCache(byte_tokenizer()).get(ResponseFormat("json_schema", checked))
    assert grammar is not None and grammar.ignored_formats == ("color", "int32")
    assert accepts(grammar.source, '{"n":5,"c":"anything"}')
    with pytest.raises(SchemaError, match="'format' 'color' is not supported"):
        check_schema({"type": "object", "properties": {"c": {"type": "string", "format": "color"}},
                      "required": ["c"], "additionalProperties": False}, strict=True, what="x")


def test_keywords_beside_ref_follow_the_draft() -> None:
    defs = {"s": S}
    check({"$schema": DRAFT4, "definitions": defs, "properties": {"x": {"$ref": "#/definitions/s", "maxLength": 2}}},
          ['{"x":"abcdef"}'], ['{"x":1}'])
    check({"definitions": defs, "properties": {"x": {"$ref": "#/definitions/s", "maxLength": 2}}},
          ['{"x":"ab"}'], ['{"x":"abc"}'])


def test_circular_reference_beside_other_keywords_compiles() -> None:
    node = {"type": "object", "properties": {"kids": {"type": "array", "items": {
        "type": "object", "anyOf": [{"$ref": "#/definitions/node"}, {"$ref": "#/definitions/leaf"}]}}}}
    schema = {"definitions": {"node": node, "leaf": {"type": "object", "properties": {"v": I},
                                                     "required": ["v"]}}, "$ref": "#/definitions/node"}
    check(schema, ['{"kids":[{"v":1},{"kids":[]}]}'], ['{"kids":[1]}'])


# As WashingtonPost's ANS schemas are: a listed property that a pattern also matches, where both sides are
# references and one is recursive. llguidance cannot intersect a recursive reference; the rewrite intersects the
# targets itself and drops the branches that cannot meet (here the leaf, by its "type" tag).
RELATED = {"$schema": DRAFT4, "definitions": {
    "content": {"type": "object", "properties": {"type": S, "related": {"$ref": "#/definitions/related"}},
                "required": ["type"]},
    "leaf": {"type": "object", "properties": {"type": {"enum": ["leaf"]}}, "required": ["type"],
             "additionalProperties": False},
    "redirect": {"type": "object", "properties": {"type": {"enum": ["redirect"]}, "url": S},
                 "required": ["type", "url"], "additionalProperties": False},
    "related": {"type": "object", "properties": {"redirect": {"type": "array", "items": {
        "$ref": "#/definitions/redirect"}, "maxItems": 1}}, "patternProperties": {".*": {"type": "array", "items": {
            "anyOf": [{"$ref": "#/definitions/content"}, {"$ref": "#/definitions/leaf"}]}}}}},
    "$ref": "#/definitions/content"}


def test_a_property_and_a_pattern_meet_through_a_recursive_reference() -> None:
    check(RELATED, ['{"type":"a","related":{"redirect":[{"type":"redirect","url":"u"}]}}',
                    '{"type":"a","related":{"x":[{"type":"leaf"},{"type":"b","related":{}}]}}'],
          ['{"type":"a","related":{"redirect":[{"type":"leaf"}]}}',
           '{"type":"a","related":{"redirect":[{"type":"redirect"}]}}',
           '{"type":"a","related":{"redirect":[{"type":"redirect","url":"u"},{"type":"redirect","url":"v"}]}}'])


def test_draft4_fragment_ids_are_anchors_and_the_root_uri_is_local() -> None:
    check({"$schema": DRAFT4, "definitions": {"gate": {"id": "#gate", "type": "object", "properties": {"n": I},
                                                       "required": ["n"]}},
           "type": "object", "properties": {"g": {"$ref": "#gate"}}}, ['{"g":{"n":1}}', "{}"], ['{"g":{}}'])
    uri = "http://example.com/tree.json#"
    check({"$schema": DRAFT4, "id": uri, "type": "object", "properties": {"v": I, "kids": {
        "type": "array", "items": {"$ref": uri}}}}, ['{"v":1,"kids":[{"v":2,"kids":[]}]}'], ['{"kids":[{"v":"x"}]}'])


def test_draft4_tuples_and_exclusive_flags() -> None:
    check({"$schema": DRAFT4, "type": "array", "items": [I, S], "additionalItems": False},
          ['[1,"a"]', "[1]"], ['[1,"a",2]', '["a"]'])
    check({"$schema": DRAFT4, "type": "number", "minimum": 5, "exclusiveMinimum": True}, ["5.5", "6"], ["5"])


def test_contains_puts_a_matching_item_first() -> None:
    check({"type": "array", "items": I, "contains": {"const": 5}}, ["[5]", "[5,1]"], ["[]", "[1]"],
          narrowed=["[1,5]"])


def test_property_names() -> None:
    check({"type": "object", "properties": {"ok": I, "no way": I}, "additionalProperties": False,
           "propertyNames": {"pattern": "^[a-z]+$"}}, ['{"ok":1}', "{}"], ['{"no way":1}'])
    check({"type": "object", "additionalProperties": I, "propertyNames": {"enum": ["a", "b"]}},
          ['{"a":1}', '{"a":1,"b":2}'], ['{"c":1}'])


def test_strict_mode_refuses_what_it_always_refused() -> None:
    strict = {"type": "object", "properties": {"a": {"type": "array", "items": S, "uniqueItems": True}},
              "required": ["a"], "additionalProperties": False}
    with pytest.raises(SchemaError, match="'uniqueItems' is not permitted"):
        check_schema(strict, strict=True, what="x")
    assert check_schema(strict, strict=False, what="x")["properties"]["a"]["maxItems"] == 1


CORPUS = [TAGGED, PETS, COORDINATES, DEPENDENCIES, DEPENDENT, CONDITIONAL, SWITCH, NOT_REQUIRED, NOT_ENUM,
          NOT_TYPE, NOT_CHARS, UNIQUE_ENUM, UNIQUE_OPEN, MIN_PROPERTIES, MAX_PROPERTIES, RELATED]


@pytest.mark.parametrize("schema", CORPUS, ids=[str(i) for i in range(len(CORPUS))])
def test_random_documents_under_rewritten_grammars_validate(schema: dict) -> None:
    grammar = GrammarCache(byte_tokenizer()).get(ResponseFormat("json_schema", check_schema(schema, strict=False,
                                                                                           what="x")))
    assert grammar is not None
    cls = jsonschema.validators.validator_for(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    for seed in range(12):
        model = ByteModel(seed, favour=b'"]}0')
        events = list(decode(model, [ord("x")], SamplingParams(max_tokens=600, temperature=1.0, seed=seed),
                             grammar.matcher()))
        assert isinstance(events[-1], Done) and events[-1].finish_reason == "stop"
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        assert validator.is_valid(json.loads(text)), text


def test_warning_header_names_the_formats_not_enforced() -> None:
    from smolrun.constraints.grammar import warning_headers

    cache = GrammarCache(byte_tokenizer())
    plain = cache.get(ResponseFormat("json_schema", check_schema({"type": "string", "format": "date"}, strict=False,
                                                                   what="x")))
    unknown = cache.get(ResponseFormat("json_schema", check_schema({"type": "string", "format": "semver"},
                                                                     strict=False, what="x")))
    assert warning_headers(plain) == {} and warning_headers(None) == {}
    assert warning_headers(unknown) == {"x-smolrun-warnings": "formats not enforced: semver"}
