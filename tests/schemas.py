"""A corpus of varied schemas: every OpenAI strict-mode feature, plus non-strict extras llguidance guarantees."""

from __future__ import annotations

from typing import Any


def obj(props: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False, **extra}


S = {"type": "string"}
I = {"type": "integer"}  # noqa: E741
N = {"type": "number"}
B = {"type": "boolean"}

# (name, schema, strict)
STRICT: list[tuple[str, dict[str, Any]]] = [
    ("string", obj({"a": S})),
    ("integer", obj({"n": I})),
    ("number", obj({"x": N})),
    ("boolean", obj({"ok": B})),
    ("null", obj({"nothing": {"type": "null"}})),
    ("all_types", obj({"s": S, "i": I, "n": N, "b": B})),
    ("enum_string", obj({"color": {"type": "string", "enum": ["red", "green", "blue"]}})),
    ("enum_mixed", obj({"v": {"enum": [1, "two", None, True]}})),
    ("const", obj({"kind": {"const": "invoice"}, "version": {"const": 2}})),
    ("nullable_string", obj({"nick": {"type": ["string", "null"]}})),
    ("nullable_enum", obj({"unit": {"type": ["string", "null"], "enum": ["F", "C"]}})),
    ("anyof_scalar", obj({"id": {"anyOf": [I, S]}})),
    ("anyof_objects", obj({"shape": {"anyOf": [obj({"radius": N}), obj({"w": N, "h": N})]}})),
    ("anyof_null_object", obj({"parent": {"anyOf": [obj({"name": S}), {"type": "null"}]}})),
    ("nested", obj({"user": obj({"name": S, "address": obj({"city": S, "zip": S})})})),
    ("deep_nesting", obj({"a": obj({"b": obj({"c": obj({"d": obj({"e": I})})})})})),
    ("array_strings", obj({"tags": {"type": "array", "items": S}})),
    ("array_bounds", obj({"xs": {"type": "array", "items": I, "minItems": 2, "maxItems": 4}})),
    ("array_exact", obj({"rgb": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255},
                                 "minItems": 3, "maxItems": 3}})),
    ("array_objects", obj({"items": {"type": "array", "items": obj({"sku": S, "qty": I}), "maxItems": 3}})),
    ("array_nested", obj({"grid": {"type": "array", "maxItems": 2,
                                   "items": {"type": "array", "items": I, "maxItems": 2}}})),
    ("min_max_int", obj({"age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("exclusive_bounds", obj({"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}})),
    ("multiple_of_int", obj({"even": {"type": "integer", "multipleOf": 2, "minimum": 0, "maximum": 100}})),
    ("multiple_of_float", obj({"half": {"type": "number", "multipleOf": 0.5, "minimum": 0, "maximum": 10}})),
    ("negative_range", obj({"t": {"type": "integer", "minimum": -40, "maximum": -10}})),
    ("pattern_digits", obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}})),
    ("pattern_code", obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"}})),
    ("pattern_hex", obj({"color": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}})),
    ("format_date", obj({"d": {"type": "string", "format": "date"}})),
    ("format_datetime", obj({"ts": {"type": "string", "format": "date-time"}})),
    ("format_time", obj({"t": {"type": "string", "format": "time"}})),
    ("format_duration", obj({"p": {"type": "string", "format": "duration"}})),
    ("format_email", obj({"email": {"type": "string", "format": "email"}})),
    ("format_hostname", obj({"host": {"type": "string", "format": "hostname"}})),
    ("format_ipv4", obj({"ip": {"type": "string", "format": "ipv4"}})),
    ("format_ipv6", obj({"ip": {"type": "string", "format": "ipv6"}})),
    ("format_uuid", obj({"id": {"type": "string", "format": "uuid"}})),
    ("defs_ref", {**obj({"home": {"$ref": "#/$defs/addr"}, "work": {"$ref": "#/$defs/addr"}}),
                  "$defs": {"addr": obj({"street": S, "city": S})}}),
    ("recursive_defs", {**obj({"root": {"$ref": "#/$defs/node"}}),
                        "$defs": {"node": obj({"value": I, "children": {"type": "array", "maxItems": 2,
                                                                        "items": {"$ref": "#/$defs/node"}}})}}),
    ("recursive_root", obj({"name": S, "sub": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}})),
    ("linked_list", {**obj({"head": {"$ref": "#/$defs/cell"}}),
                     "$defs": {"cell": obj({"v": I,
                                            "next": {"anyOf": [{"$ref": "#/$defs/cell"}, {"type": "null"}]}})}}),
    ("annotations", obj({"a": {"type": "string", "description": "the a", "title": "A"}}, title="Ann",
                        description="with annotations")),
    ("invoice", obj({"invoice_number": S, "date": {"type": "string", "format": "date"},
                     "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
                     "lines": {"type": "array", "maxItems": 3, "items": obj({"desc": S, "amount": N})},
                     "total": N})),
    ("many_fields", obj({f"f{i}": [S, I, B, N][i % 4] for i in range(13)})),
    ("event", obj({"title": S, "start": {"type": "string", "format": "date-time"},
                   "attendees": {"type": "array", "items": {"type": "string", "format": "email"}, "maxItems": 3}})),
]

# Non-strict: guaranteed by llguidance beyond OpenAI's strict subset.
EXTRA: list[tuple[str, dict[str, Any]]] = [
    ("optional_props", {"type": "object", "properties": {"a": S, "b": I}, "required": ["a"],
                        "additionalProperties": False}),
    ("string_lengths", {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 5}},
                        "required": ["s"], "additionalProperties": False}),
    ("prefix_items", {"type": "array", "prefixItems": [S, I, B], "items": False}),
    ("allof", {"allOf": [{"type": "object", "properties": {"a": S}, "required": ["a"]},
                         {"properties": {"b": I}, "required": ["b"]}]}),
    ("oneof_disjoint", obj({"v": {"oneOf": [S, I]}})),
    ("root_array", {"type": "array", "items": I, "maxItems": 3}),
    ("min_max_properties", {"type": "object", "properties": {"a": S, "b": S}, "required": ["a", "b"],
                            "minProperties": 2, "maxProperties": 2, "additionalProperties": False}),
    ("type_list", obj({"v": {"type": ["integer", "string"]}})),
    ("uri_format", obj({"link": {"type": "string", "format": "uri"}})),
]

CORPUS: list[tuple[str, dict[str, Any], bool]] = [(n, s, True) for n, s in STRICT] + [(n, s, False) for n, s in EXTRA]
