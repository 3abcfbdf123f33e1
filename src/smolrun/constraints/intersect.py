"""Intersections computed before llguidance sees them: llguidance intersects schemas (allOf, keywords beside a
reference, a property and the patterns its name matches) but cannot intersect a recursive reference with
anything, so the references such an intersection reaches are unfolded here, and what is plain is merged."""

from __future__ import annotations

import re
from typing import Any

from smolrun.constraints.drafts import LISTS, MAPS, SINGLES
from smolrun.constraints.formats import IGNORED_FORMAT
from smolrun.constraints.logic import Resolver, Schema, all_of, any_of, disjoint, facts, kinds_schema, type_kinds

# Keywords that say something about a value; every other key (annotations, definitions, unknown keys that a
# reference may point into) stays where it is when a node is split into alternatives.
VALIDATION = frozenset({
    "type", "enum", "const", "anyOf", "oneOf", "allOf", "not", "if", "then", "else", "$ref", "properties",
    "required", "additionalProperties", "patternProperties", "minProperties", "maxProperties", "propertyNames",
    "dependentRequired", "dependentSchemas", "items", "prefixItems", "minItems", "maxItems", "uniqueItems",
    "contains", "minContains", "maxContains", "minLength", "maxLength", "pattern", "format", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})


def validation(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k in VALIDATION}


def outside(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k not in VALIDATION}


ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "$id", "id",
                          "definitions", "$defs", "deprecated", "readOnly", "writeOnly", IGNORED_FORMAT})


def unfold_siblings(node: Schema, resolve: Resolver) -> Schema:
    """Every reference that shares a node with other keywords, replaced by its target as deep as those keywords
    reach: llguidance intersects schemas but not a recursive reference with anything."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = _align_items(_flatten(_disjoint_patterns(
        {k: _unfold_children(k, v, resolve) for k, v in node.items()}, resolve)))
    if "type" in out:  # a type every alternative has anyway: dropped, so that nothing needs intersecting
        kinds = type_kinds(out["type"])
        alternatives = [out[k] for k in ("anyOf", "oneOf") if isinstance(out.get(k), list)]
        alternatives += [[{"$ref": out["$ref"]}]] if "$ref" in out else []
        if alternatives and all(facts(b, resolve).kinds <= kinds for group in alternatives for b in group):
            del out["type"]
    members: list[Schema] = out["allOf"] if isinstance(out.get("allOf"), list) else []
    if "$ref" in out and len(set(out) - ANNOTATIONS) > 1:
        siblings = {k: v for k, v in out.items() if k != "$ref"}
        out = {**siblings, "allOf": [*members, _unfold({"$ref": out["$ref"]}, siblings, resolve, 0)]}
        members = out["allOf"]
    for key in ("anyOf", "oneOf"):
        siblings = {k: v for k, v in out.items() if k not in (key, "allOf") and k not in ANNOTATIONS}
        if isinstance(out.get(key), list) and (siblings or members):
            out[key] = [_unfold(branch, {"allOf": [siblings, *members]}, resolve, 0) for branch in out[key]]
    if len(members) > 1 or (members and set(out) - ANNOTATIONS - {"allOf"}):
        unfolded = []
        for i, member in enumerate(members):
            others = [m for j, m in enumerate(members) if j != i] + [{k: v for k, v in out.items() if k != "allOf"}]
            unfolded.append(_unfold(member, {"allOf": others}, resolve, 0))
        merged: Schema = {k: v for k, v in out.items() if k != "allOf"}
        kept: list[Schema] = []
        for member in unfolded:
            both = merge_objects(merged, member, resolve) if isinstance(merged, dict) else None
            if both is None:
                kept.append(member)
            else:
                merged = both
        if not isinstance(merged, dict):
            return merged
        out = {**merged, "allOf": kept} if kept else merged
    if isinstance(out.get("anyOf"), list):
        siblings = {k: v for k, v in validation(out).items() if k != "anyOf"}
        if siblings:
            spread = [merge_objects(siblings, branch, resolve) for branch in out["anyOf"]]
            if all(b is not None for b in spread):
                out = {**outside(out),
                       "anyOf": [b for b in spread if b is not False]}
    return out


_CLASS = re.compile(r"^\^\(?\[([A-Za-z0-9_\-\\]*)\]\)?([*+])\$$")


def _name_chars(pattern: str) -> tuple[frozenset[str] | None, int] | None:
    """The characters and least length of the names a pattern matches, for "^[...]*$"-like patterns and those
    matching every name (None characters: any)."""
    if pattern in ("", "^", ".*", "^.*") or re.fullmatch(r"\^\[[^\]]*\]\*", pattern):
        return None, 0
    found = _CLASS.match(pattern)
    if found is None:
        return None
    body = found.group(1).replace("\\d", "0-9").replace("\\w", "a-zA-Z0-9_")
    if "\\" in body:
        return None
    chars: set[str] = set()
    i = 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            chars |= {chr(c) for c in range(ord(body[i]), ord(body[i + 2]) + 1)}
            i += 3
        else:
            chars.add(body[i])
            i += 1
    return frozenset(chars), 1 if found.group(2) == "+" else 0


def _names_but(chars: frozenset[str] | None, least: int, words: list[str]) -> str:
    """A pattern for the names of `chars` (any when None), at least `least` long, except `words`."""
    def cls(allowed: frozenset[str] | None, without: set[str]) -> str | None:
        if allowed is None:
            return f"[^{''.join(_char(c) for c in sorted(without))}]" if without else "[\\s\\S]"
        left = sorted(allowed - without)
        return f"[{''.join(_char(c) for c in left)}]" if left else None

    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for c in word:
            node = node.setdefault(c, {})
        node[""] = {}

    def alternatives(node: dict[str, Any], depth: int) -> str:
        children = {c for c in node if c}
        alts = [] if "" in node or depth < least else [""]
        first, rest = cls(chars, children), cls(chars, set())
        if first is not None:
            alts.append(f"{first}{rest}*")
        alts += [f"{_char(c)}(?:{alternatives(node[c], depth + 1)})" for c in sorted(children)]
        return "|".join(alts) if alts else "[^\\s\\S]"

    return f"^(?:{alternatives(trie, 0)})$"


def _char(c: str) -> str:
    return c if c.isascii() and c.isalnum() else f"\\u{ord(c):04x}"


def _disjoint_patterns(node: dict[str, Any], resolve: Resolver) -> dict[str, Any]:
    """A pattern beside listed properties that some of them match, made to match only the others: llguidance
    intersects a property with each pattern its name matches, which it cannot do with a recursive reference."""
    patterns, props = node.get("patternProperties"), node.get("properties")
    if not isinstance(patterns, dict) or not isinstance(props, dict) or len(patterns) != 1:
        return node
    pattern, sub = next(iter(patterns.items()))
    shape = _name_chars(pattern)
    if shape is None or any(ord(c) > 0xFFFF for name in props for c in name):
        return node
    chars, least = shape
    matching = [n for n in props if len(n) >= least and (chars is None or set(n) <= chars)]
    if not matching:
        return node
    bare = validation(sub) if isinstance(sub, dict) else sub
    new_props = dict(props)
    for name in matching:
        schema = props[name]
        same = isinstance(schema, dict) and validation(schema) == bare
        new_props[name] = schema if same or schema is False else _intersect(schema, sub, resolve)
    return {**node, "properties": new_props, "patternProperties": {_names_but(chars, least, matching): sub}}


def _inline(schema: Schema, resolve: Resolver) -> Schema:
    if isinstance(schema, dict) and set(validation(schema)) == {"$ref"}:
        target = resolve(schema["$ref"])
        if isinstance(target, dict) and "$id" not in target and "id" not in target:
            return target
    return schema


def _intersect(a: Schema, b: Schema, resolve: Resolver, depth: int = 0) -> Schema:
    """a and b as one schema, computed here where it is plain (references followed one level, alternatives that
    cannot meet dropped), else their allOf."""
    if a == b or depth > 6:
        return a if a == b else all_of([a, b])
    a, b = _inline(a, resolve), _inline(b, resolve)
    for x, y in ((a, b), (b, a)):
        if isinstance(y, dict) and set(validation(y)) == {"anyOf"} and isinstance(y["anyOf"], list):
            return any_of([_intersect(x, branch, resolve, depth + 1) for branch in y["anyOf"]
                           if not disjoint(x, branch, resolve)])
    merged = merge_objects(a, b, resolve, depth + 1)
    return merged if merged is not None else all_of([a, b])


def merge_objects(a: Schema, b: Schema, resolve: Resolver, depth: int = 0) -> Schema | None:
    """The intersection of two schemas as one, where it is plain (None where it is not): what llguidance
    would compute, without resolving the references inside."""
    if a is False or b is False:
        return False
    if a is True or b is True:
        return b if a is True else a
    if "$ref" in a or "$ref" in b or ("anyOf" in a and "anyOf" in b):
        return None
    for x, y in ((a, b), (b, a)):  # a keyword that reads its neighbours would read the other side's too
        if ("prefixItems" in x and "items" in y and "prefixItems" not in y) or (
                "patternProperties" in x and "additionalProperties" in y):
            return None
    out = validation(a)
    for key, value in b.items():
        if key not in VALIDATION or key in ("properties", "required", "type", "allOf"):
            continue
        if key in out and out[key] != value:
            if key not in ("items", "additionalProperties") or depth > 6:
                return None
            value = _intersect(out[key], value, resolve, depth)
        out[key] = value
    if "type" in a or "type" in b:
        kinds = type_kinds(a.get("type", list(_ALL_TYPES))) & type_kinds(b.get("type", list(_ALL_TYPES)))
        typed = kinds_schema(kinds)
        if not isinstance(typed, dict):
            return None if typed is None else False if typed is False else None
        out["type"] = typed["type"]
    props: dict[str, Schema] = {}
    for side, other in ((a, b), (b, a)):
        for name, sub in (side.get("properties") or {}).items():
            if name in props:
                continue
            theirs = (other.get("properties") or {}).get(name)
            if theirs is None:
                if other.get("patternProperties"):
                    return None
                theirs = other.get("additionalProperties", True)
            props[name] = _intersect(sub, theirs, resolve, depth) if theirs is not True else sub
    if props:
        out["properties"] = props
    required = [*a.get("required", []), *[r for r in b.get("required", []) if r not in a.get("required", [])]]
    if required:
        out["required"] = required
    members = [*a.get("allOf", []), *b.get("allOf", [])]
    if members:
        out["allOf"] = members
    return out


_ALL_TYPES = ("null", "boolean", "object", "array", "string", "number")


def _prefix_length(schema: Schema) -> int:
    return len(schema["prefixItems"]) if isinstance(schema, dict) and isinstance(schema.get("prefixItems"),
                                                                                   list) else 0


def _padded(schema: Schema, length: int) -> Schema:
    """The same array schema with `prefixItems` spelled out to `length` positions."""
    if not isinstance(schema, dict) or _prefix_length(schema) >= length or not ("items" in schema or
                                                                                "prefixItems" in schema):
        return schema
    rest = schema.get("items", True)
    prefix = schema.get("prefixItems", [])
    return {**schema, "prefixItems": [*prefix, *[rest] * (length - len(prefix))], "items": rest}


def _align_items(node: dict[str, Any]) -> dict[str, Any]:
    """Every side of an intersection with the same number of `prefixItems`: llguidance intersects one side's
    `prefixItems` with the other's `items` as if `items` did not apply to those positions."""
    members: list[Schema] = node["allOf"] if isinstance(node.get("allOf"), list) else []
    branches: list[Schema] = node["anyOf"] if isinstance(node.get("anyOf"), list) else []
    if not members and not branches:
        return node
    length = max(_prefix_length(s) for s in [node, *members, *branches])
    if not length:
        return node
    out = _padded(node, length)
    assert isinstance(out, dict)
    if members:
        out["allOf"] = [_padded(m, length) for m in members]
    if branches:
        out["anyOf"] = [_padded(b, length) for b in branches]
    return out


_TOGETHER = ({"properties", "patternProperties", "additionalProperties"}, {"prefixItems", "items"},
             {"if", "then", "else"}, {"contains", "minContains", "maxContains"})


def _flatten(node: dict[str, Any]) -> dict[str, Any]:
    """allOf members merged into their node where no keyword of one reads a keyword of the other."""
    members = node.get("allOf")
    if not isinstance(members, list):
        return node
    out = {k: v for k, v in node.items() if k != "allOf"}
    kept: list[Schema] = []
    for member in members:
        if isinstance(member, dict) and not set(member) & set(out) and not any(
                set(member) & group and set(out) & group for group in _TOGETHER):
            out.update(member)
        else:
            kept.append(member)
    if kept:
        out["allOf"] = kept
    return out


def _unfold_children(key: str, value: Any, resolve: Resolver) -> Any:
    if key in MAPS and isinstance(value, dict):
        return {name: unfold_siblings(sub, resolve) for name, sub in value.items()}
    if key in LISTS and isinstance(value, list):
        return [unfold_siblings(sub, resolve) for sub in value]
    return unfold_siblings(value, resolve) if key in SINGLES else value


def _unfold(node: Schema, against: Schema, resolve: Resolver, depth: int) -> Schema:
    """`node`, with its references replaced by their targets where `against` says something about the value."""
    if not isinstance(node, dict) or not isinstance(against, dict) or depth > 8:
        return node
    if "$ref" in node:
        target = resolve(node["$ref"])
        if not isinstance(target, dict) or "$id" in target or "id" in target:
            return node
        rest = {k: v for k, v in node.items() if k != "$ref"}
        node = {**target, **rest} if not set(target) & set(rest) else {**rest, "allOf": [target]}
    keys = _constrained(against, resolve, 0)
    out = dict(node)
    for key in ("properties", "patternProperties"):
        if isinstance(out.get(key), dict):
            out[key] = {name: _unfold(sub, _at(against, key, name, resolve), resolve, depth + 1) if name in keys
                        else sub for name, sub in out[key].items()}
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [_unfold(sub, against, resolve, depth + 1) for sub in out[key]]
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _unfold(out[key], _at(against, key, None, resolve), resolve, depth + 1)
    return out


def _constrained(schema: Schema, resolve: Resolver, depth: int) -> set[str]:
    """Property names a schema says something about (through allOf, anyOf and references)."""
    if not isinstance(schema, dict) or depth > 8:
        return set()
    names = set(schema.get("properties") or {})
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            names |= _constrained(sub, resolve, depth + 1)
    target = resolve(schema["$ref"]) if "$ref" in schema else None
    return names | _constrained(target, resolve, depth + 1) if target is not None else names


def _at(schema: Schema, key: str, name: str | None, resolve: Resolver, depth: int = 0) -> Schema:
    """Everything `schema` says about one of its parts (a property, the items), as one schema."""
    if not isinstance(schema, dict) or depth > 8:
        return True
    parts: list[Schema] = []
    own = schema.get(key)
    if name is None and isinstance(own, dict | bool):
        parts.append(own)
    elif name is not None and isinstance(own, dict) and name in own:
        parts.append(own[name])
    for group in ("allOf", "anyOf", "oneOf"):
        parts += [_at(sub, key, name, resolve, depth + 1) for sub in schema.get(group) or []]
    target = resolve(schema["$ref"]) if "$ref" in schema else None
    if target is not None:
        parts.append(_at(target, key, name, resolve, depth + 1))
    return all_of(parts)
