import pytest

from smolrun.constraints import check_schema
from smolrun.errors import SchemaError


def strict_obj(props: dict, **extra: object) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False, **extra}


@pytest.mark.parametrize(
    ("schema", "context", "keyword", "strict"),
    [
        # Strict mode refuses these as it always has; without strict they are rewritten (see test_rewrite.py).
        (strict_obj({"data": {"not": {"type": "string"}}}), "('properties', 'data')", "'not'", True),
        (strict_obj({"a": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}),
         "('properties', 'a')", "'uniqueItems'", True),
        (strict_obj({"a": {"type": "array", "contains": {"const": 1}}}), "('properties', 'a')", "'contains'", True),
        (strict_obj({"a": {"type": "string"}}, **{"if": {}, "then": {}}), "()", "'if'", True),
        (strict_obj({"a": {"type": "object", "propertyNames": {"maxLength": 3}}}), "('properties', 'a')",
         "'propertyNames'", True),
        (strict_obj({"a": {"type": "string", "format": "credit-card"}}), "('properties', 'a')", "'format'", True),
        (strict_obj({"a": {"anyOf": [{"type": "string"}, {"dependentRequired": {}}]}}),
         "('properties', 'a', 'anyOf', '1')", "'dependentRequired'", True),
        # Refused in both modes.
        (strict_obj({"a": {"$ref": "https://example.com/s.json"}}), "('properties', 'a')", "'$ref'", False),
        (strict_obj({"a": {"type": "string", "pattern": "(?=x)y"}}), "('properties', 'a')", "'pattern'", False),
        ({"type": "object", "$defs": {"n": {"type": "object", "unevaluatedProperties": False}}},
         "('$defs', 'n')", "'unevaluatedProperties'", False),
        (strict_obj({"a": {"type": "strin"}}), "('properties', 'a')", "'type'", False),
        (strict_obj({"a": {"type": "array", "items": {"type": "string"}, "uniqueItems": True, "minItems": 2}}),
         "('properties', 'a')", "'uniqueItems'", False),
    ],
)
def test_refuses_what_cannot_be_guaranteed_naming_keyword_and_path(schema: dict, context: str, keyword: str,
                                                                  strict: bool) -> None:
    with pytest.raises(SchemaError) as err:
        check_schema(schema, strict=strict, what="response_format 'x'")
    message = err.value.message
    assert f"In context={context}" in message
    assert keyword in message
    assert message.startswith("Invalid schema for response_format 'x'")
    assert err.value.status == 400 and err.value.type == "invalid_request_error"


def test_strict_mode_applies_openai_structural_rules() -> None:
    with pytest.raises(SchemaError, match=r"In context=\(\), 'additionalProperties' is required"):
        check_schema({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}, strict=True,
                     what="x")
    with pytest.raises(SchemaError, match=r"context=\('properties', 'o'\).*Missing 'b'"):
        check_schema(strict_obj({"o": {"type": "object", "properties": {"a": {}, "b": {}}, "required": ["a"],
                                       "additionalProperties": False}}), strict=True, what="x")
    with pytest.raises(SchemaError, match="root schema must be an object"):
        check_schema({"type": "array"}, strict=True, what="x")


def test_non_strict_allows_optional_properties_and_any_root() -> None:
    check_schema({"type": "object", "properties": {"a": {"type": "string"}}}, strict=False, what="x")
    check_schema({"type": "array", "items": {"type": "integer"}}, strict=False, what="x")


def test_nullable_enum_keeps_standard_semantics_and_input_is_not_mutated() -> None:
    # OpenAI reads this as "F, C or null"; JSON Schema allows only "F" or "C". We follow JSON Schema, so
    # the output always validates against the user's own schema with any validator.
    schema = strict_obj({"unit": {"type": ["string", "null"], "enum": ["F", "C"]}})
    out = check_schema(schema, strict=True, what="x")
    assert out["properties"]["unit"]["enum"] == ["F", "C"]
    dated = strict_obj({"d": {"type": "string", "format": "date"}})
    assert "pattern" in check_schema(dated, strict=True, what="x")["properties"]["d"]
    assert dated["properties"]["d"] == {"type": "string", "format": "date"}


def test_annotations_are_tolerated() -> None:
    schema = strict_obj({"a": {"type": "string", "title": "A", "description": "d", "default": "x",
                               "examples": ["y"], "$comment": "c"}}, title="Root", **{"$schema": "x"})
    assert check_schema(schema, strict=True, what="x")["title"] == "Root"


def test_not_an_object() -> None:
    with pytest.raises(SchemaError, match="must be a JSON object"):
        check_schema(["not", "a", "schema"], strict=False, what="x")
