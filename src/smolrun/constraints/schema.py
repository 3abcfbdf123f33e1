"""Walk a JSON Schema, refuse what cannot be guaranteed (naming keyword and path), normalise the rest."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

from smolrun.constraints.drafts import Unsupported
from smolrun.constraints.formats import FORMATS, STRICT_FORMATS
from smolrun.constraints.rewrite import rewrite
from smolrun.errors import SchemaError

Path = tuple[str, ...]

# Keywords llguidance enforces during decoding: all that strict mode takes.
ENFORCED = frozenset(
    {
        "type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
        "properties", "required", "additionalProperties", "patternProperties", "minProperties", "maxProperties",
        "items", "prefixItems", "minItems", "maxItems",
        "minLength", "maxLength", "pattern", "format",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    }
)
# Keywords strict mode refuses, as it always has; without strict, constraints.rewrite turns them into the
# keywords above (see README, "Structured outputs") and refuses only what it cannot enforce.
REFUSED = frozenset(
    {
        "not", "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains",
        "propertyNames", "dependentRequired", "dependentSchemas", "dependencies",
        "unevaluatedProperties", "unevaluatedItems", "additionalItems", "$dynamicRef", "$recursiveRef",
    }
)
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})

# JSON nesting a schema may have (a property's schema is two levels below its object's: "properties", its
# name): about 50 schema levels, five times what OpenAI's strict mode allows, and far from the recursion limit.
MAX_NESTING = 100

_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_SINGLE = ("additionalProperties", "items")


def _nesting(value: Any) -> int:
    """How deep JSON objects and arrays nest in `value`, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_NESTING:
            stack.extend((child, depth + 1) for child in children)
    return deepest


def check_schema(raw: Any, *, strict: bool, what: str) -> dict[str, Any]:
    """Return a normalised copy of `schema` or raise SchemaError.

    `what` names the schema in messages, e.g. "response_format 'person'". With `strict`, OpenAI's
    structural rules apply as well (object root, every property required, additionalProperties false),
    so a schema accepted here is accepted by OpenAI's strict mode too.
    """
    if not isinstance(raw, dict):
        raise SchemaError(f"Invalid schema for {what}: the schema must be a JSON object.")
    if _nesting(raw) > MAX_NESTING:
        raise SchemaError(f"Invalid schema for {what}: it is nested more than {MAX_NESTING} levels deep.")
    schema: dict[str, Any] = copy.deepcopy(raw)
    if strict and (schema.get("type") != "object" or "anyOf" in schema):
        _fail(what, (), "the root schema must be an object (\"type\": \"object\") and not use 'anyOf'")
    if not strict:
        try:
            rewritten = rewrite(schema)
        except Unsupported as exc:
            _fail(what, exc.path, exc.reason)
        for note in rewritten.approximations:
            logging.getLogger("smolrun").debug("%s: %s", what, note)
        schema = rewritten.schema
    for path, node in _walk(schema, ()):
        _check_node(node, path, strict=strict, what=what)
    return schema


def _walk(node: Any, path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise SchemaError(f"In context={path!r}, a schema must be an object or a boolean.")
    yield path, node
    for key in _SUBSCHEMA_MAPS:
        children = node.get(key)
        if isinstance(children, dict):
            for name, child in children.items():
                yield from _walk(child, (*path, key, name))
    for key in _SUBSCHEMA_LISTS:
        children = node.get(key)
        if isinstance(children, list):
            for i, child in enumerate(children):
                yield from _walk(child, (*path, key, str(i)))
    for key in _SUBSCHEMA_SINGLE:
        if key in node and isinstance(node[key], dict | bool):
            yield from _walk(node[key], (*path, key))


def _fail(what: str, path: Path, reason: str) -> None:
    raise SchemaError(f"Invalid schema for {what}: In context={path!r}, {reason}.")


def _check_node(node: dict[str, Any], path: Path, *, strict: bool, what: str) -> None:
    for key in node:
        if strict and key in REFUSED:
            _fail(what, path, f"'{key}' is not permitted (smolrun cannot guarantee it during decoding)")
    types = node.get("type")
    type_list = types if isinstance(types, list) else [types] if types is not None else []
    for t in type_list:
        if t not in TYPES:
            _fail(what, path, f"'type' {t!r} is not a JSON Schema type")
    fmt = node.get("format")
    if fmt is not None and fmt not in FORMATS:  # without strict, rewrite has replaced every other format
        _fail(what, path, f"'format' {fmt!r} is not supported (supported: {', '.join(sorted(FORMATS))})")
    if fmt in STRICT_FORMATS and "pattern" not in node:
        node["pattern"] = STRICT_FORMATS[fmt]
        del node["format"]
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        _fail(what, path, f"'$ref' {ref!r} is not permitted: only local references ('#...') are resolved")
    pattern = node.get("pattern")
    if pattern is not None:
        _check_pattern(pattern, path, what)
    for name in node.get("patternProperties") or {}:
        _check_pattern(name, (*path, "patternProperties"), what)
    if strict and ("properties" in node or "object" in type_list):
        _check_strict_object(node, path, what)


def _check_strict_object(node: dict[str, Any], path: Path, what: str) -> None:
    if node.get("additionalProperties") is not False:
        _fail(what, path, "'additionalProperties' is required to be supplied and to be false")
    keys = list(node.get("properties", {}))
    required = node.get("required", [])
    missing = [k for k in keys if k not in required] if isinstance(required, list) else keys
    if missing:
        _fail(
            what,
            path,
            "'required' is required to be supplied and to be an array including every key in properties. "
            f"Missing {missing[0]!r}",
        )


def _check_pattern(pattern: Any, path: Path, what: str) -> None:
    from llguidance import LLMatcher

    if not isinstance(pattern, str):
        _fail(what, path, "'pattern' must be a string")
    is_error, messages = LLMatcher.validate_grammar_with_warnings(LLMatcher.grammar_from_regex(pattern))
    if is_error:
        first = messages[0].strip().splitlines()[-1] if messages else "invalid regular expression"
        _fail(what, path, f"'pattern' {pattern!r} is not supported: {first}")
