"""Reasoning over JSON Schemas (2020-12 keywords): what a schema may hold, disjointness, complements."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any
from urllib.parse import unquote

Schema = dict[str, Any] | bool

# Kinds of JSON values; "fraction" is a number that is not an integer, so that every type is a union of kinds.
KINDS = frozenset({"null", "boolean", "object", "array", "string", "integer", "fraction"})
_TYPE_KINDS = {"null": {"null"}, "boolean": {"boolean"}, "object": {"object"}, "array": {"array"},
               "string": {"string"}, "integer": {"integer"}, "number": {"integer", "fraction"}}
# Keys that never change which values a schema accepts.
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "$id", "id",
                         "definitions", "$defs", "deprecated", "readOnly", "writeOnly", "$anchor",
                         "contentMediaType", "contentEncoding", "contentSchema"})
MAX_DEPTH = 12  # references followed and branches split while reasoning: beyond it, nothing is concluded


def kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "fraction"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def value_key(value: Any) -> str:
    """Equal keys for values JSON Schema calls equal (1 == 1.0, true != 1)."""
    def norm(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, list):
            return [norm(x) for x in v]
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        return v
    return json.dumps(norm(value), sort_keys=True)


def type_kinds(types: Any) -> frozenset[str]:
    names = types if isinstance(types, list) else [types]
    return frozenset(k for t in names if isinstance(t, str) for k in _TYPE_KINDS.get(t, ()))


def kinds_schema(kinds: frozenset[str]) -> Schema | None:
    """A schema accepting exactly the values of `kinds`; None when no `type` says it (fractions alone)."""
    if not kinds:
        return False
    if kinds == KINDS:
        return True
    if "fraction" in kinds and "integer" not in kinds:
        return None
    names = sorted(k for k in kinds if k not in ("integer", "fraction"))
    names += ["number"] if "fraction" in kinds else ["integer"] if "integer" in kinds else []
    return {"type": names[0] if len(names) == 1 else names}


class Resolver:
    """Local references ("#/...") of one document, followed as JSON pointers from its root."""

    def __init__(self, root: Schema | None) -> None:
        self.root = root  # None: references are not followed (a subschema moved the base URI)

    def __call__(self, ref: Any) -> Schema | None:
        if self.root is None or not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            return None
        node: Any = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node if isinstance(node, dict | bool) else None


@dataclass
class Facts:
    """What every value of a schema has in common (an over-approximation: sound for proving disjointness)."""

    kinds: frozenset[str] = KINDS
    values: list[Any] | None = None  # the only values allowed, when finitely many
    required: set[str] = field(default_factory=set)
    props: dict[str, list[Schema]] = field(default_factory=dict)  # what a present key's value must satisfy
    closed: set[str] | None = None  # the only keys an object may have
    min_items: int = 0
    max_items: float = math.inf
    items: list[Schema] = field(default_factory=list)  # what every item must satisfy

    def meet(self, other: Facts) -> None:
        self.kinds &= other.kinds
        if other.values is not None:
            keys = {value_key(v) for v in other.values}
            self.values = [v for v in (self.values if self.values is not None else other.values)
                           if value_key(v) in keys]
        self.required |= other.required
        for name, schemas in other.props.items():
            self.props.setdefault(name, []).extend(schemas)
        if other.closed is not None:
            self.closed = other.closed if self.closed is None else self.closed & other.closed
        self.min_items = max(self.min_items, other.min_items)
        self.max_items = min(self.max_items, other.max_items)
        self.items.extend(other.items)


def facts(schema: Schema, resolve: Resolver, depth: int = 0) -> Facts:
    if schema is False:
        return Facts(kinds=frozenset(), values=[])
    out = Facts()
    if schema is True or depth > MAX_DEPTH:
        return out
    if "type" in schema:
        out.kinds = type_kinds(schema["type"])
    if "const" in schema:
        out.values = [schema["const"]]
    if isinstance(schema.get("enum"), list):
        out.meet(Facts(values=list(schema["enum"])))
    if isinstance(schema.get("required"), list):
        out.required = {r for r in schema["required"] if isinstance(r, str)}
    for name, sub in (schema.get("properties") or {}).items():
        out.props.setdefault(name, []).append(sub)
    if schema.get("additionalProperties") is False and not schema.get("patternProperties"):
        out.closed = set(schema.get("properties") or {})
    out.min_items = schema.get("minItems", 0) if isinstance(schema.get("minItems"), int) else 0
    if isinstance(schema.get("maxItems"), int):
        out.max_items = schema["maxItems"]
    if isinstance(schema.get("items"), dict | bool) and not schema.get("prefixItems"):
        out.items.append(schema["items"])
    for sub in schema.get("allOf") or []:
        out.meet(facts(sub, resolve, depth + 1))
    if "$ref" in schema:
        target = resolve(schema["$ref"])
        if target is not None:
            out.meet(facts(target, resolve, depth + 1))
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            out.meet(_join([facts(b, resolve, depth + 1) for b in branches]))
    if out.values is not None:
        out.values = [v for v in out.values if kind(v) in out.kinds]
        out.kinds = frozenset(kind(v) for v in out.values)
    return out


def _join(all_facts: list[Facts]) -> Facts:
    """What the branches of an anyOf have in common."""
    out = Facts(kinds=frozenset().union(*(f.kinds for f in all_facts)))
    if all(f.values is not None for f in all_facts):
        out.values = [v for f in all_facts for v in f.values or []]
    out.required = set.intersection(*(f.required for f in all_facts))
    if all(f.closed is not None for f in all_facts):
        out.closed = set().union(*(f.closed or set() for f in all_facts))
    out.min_items = min(f.min_items for f in all_facts)
    out.max_items = max(f.max_items for f in all_facts)
    return out


def _search(pattern: str, text: str) -> bool | None:
    try:
        return re.search(pattern, text) is not None
    except (re.error, OverflowError):
        return None


def fails(value: Any, schema: Schema, resolve: Resolver, depth: int = 0) -> bool:
    """Whether `value` is certainly invalid against `schema` (False: valid, or not known)."""
    if schema is True or depth > MAX_DEPTH:
        return False
    if schema is False:
        return True
    f = facts(schema, resolve, depth)
    if kind(value) not in f.kinds or (f.values is not None and value_key(value) not in map(value_key, f.values)):
        return True
    if isinstance(value, str):
        if isinstance(schema.get("pattern"), str) and _search(schema["pattern"], value) is False:
            return True
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            return True
    elif kind(value) in ("integer", "fraction"):
        if value < schema.get("minimum", -math.inf) or value > schema.get("maximum", math.inf):
            return True
        if value <= schema.get("exclusiveMinimum", -math.inf) or value >= schema.get("exclusiveMaximum", math.inf):
            return True
    elif isinstance(value, dict):
        if any(r not in value for r in f.required):
            return True
        if any(name in value and fails(value[name], sub, resolve, depth + 1)
               for name, subs in f.props.items() for sub in subs):
            return True
    sub_fails = [fails(value, sub, resolve, depth + 1) for sub in schema.get("allOf") or []]
    if any(sub_fails):
        return True
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and all(fails(value, b, resolve, depth + 1) for b in schema[key]):
            return True
    target = resolve(schema["$ref"]) if "$ref" in schema else None
    return target is not None and fails(value, target, resolve, depth + 1)


def disjoint(a: Schema, b: Schema, resolve: Resolver, depth: int = 0) -> bool:
    """Whether no value is valid against both `a` and `b` (False: they may overlap, or it is not known)."""
    if a is False or b is False:
        return True
    if a is True or b is True or depth > MAX_DEPTH:
        return False
    fa, fb = facts(a, resolve, depth), facts(b, resolve, depth)
    if not fa.kinds & fb.kinds:
        return True
    for x, other in ((fa, b), (fb, a)):
        if x.values is not None and all(fails(v, other, resolve, depth + 1) for v in x.values):
            return True
    if fa.kinds <= {"object"} or fb.kinds <= {"object"}:
        for x, y in ((fa, fb), (fb, fa)):
            for name in x.required:
                if (y.closed is not None and name not in y.closed) or False in y.props.get(name, []):
                    return True
                if any(disjoint(sx, sy, resolve, depth + 1) for sx in x.props.get(name, [])
                       for sy in y.props.get(name, [])):
                    return True
    if fa.kinds <= {"array"} or fb.kinds <= {"array"}:
        if fa.max_items < fb.min_items or fb.max_items < fa.min_items:
            return True
        if max(fa.min_items, fb.min_items) >= 1 and any(
                disjoint(x, y, resolve, depth + 1) for x in fa.items for y in fb.items):
            return True
    for part, other in ((a, b), (b, a)):  # split a union: every branch must be disjoint from the other side
        if isinstance(part, dict):
            for key in ("anyOf", "oneOf"):
                if isinstance(part.get(key), list) and part[key]:
                    rest = {k: v for k, v in part.items() if k != key}
                    if all(disjoint({"allOf": [rest, br]}, other, resolve, depth + 1) for br in part[key]):
                        return True
            target = resolve(part["$ref"]) if "$ref" in part else None
            if target is not None:
                rest = {k: v for k, v in part.items() if k != "$ref"}
                if disjoint({"allOf": [rest, target]}, other, resolve, depth + 1):
                    return True
    return False


@dataclass(frozen=True)
class Complement:
    """A schema for values that fail the original; `exact` False when it leaves some of them out (it then
    accepts fewer, never a value the original accepts)."""

    schema: Schema
    exact: bool


def any_of(parts: list[Schema]) -> Schema:
    kept: list[Schema] = []
    for part in parts:
        if part is True:
            return True
        if part is not False and part not in kept:
            kept.append(part)
    return False if not kept else kept[0] if len(kept) == 1 else {"anyOf": kept}


def all_of(parts: list[Schema]) -> Schema:
    kept: list[Schema] = []
    for part in parts:
        if part is False:
            return False
        if part is not True and part not in kept:
            kept.append(part)
    return True if not kept else kept[0] if len(kept) == 1 else {"allOf": kept}


def complement(schema: Schema, resolve: Resolver, depth: int = 0) -> Complement:
    """The values `schema` rejects, as a schema: each keyword's violations, united."""
    if schema is True:
        return Complement(False, True)
    if schema is False:
        return Complement(True, True)
    if depth > MAX_DEPTH:
        return Complement(False, False)
    parts: list[Schema] = []
    exact = True

    def add(c: Complement) -> None:
        nonlocal exact
        parts.append(c.schema)
        exact = exact and c.exact

    for key, value in schema.items():
        if key in ANNOTATIONS or key.startswith("x-") or key == "type":
            continue
        rule = _RULES.get(key)
        if rule is None:
            exact = False  # a keyword these rules do not negate: its violations are left out
            continue
        add(rule(schema, value, resolve, depth))
    if "type" in schema:  # violations of other keywords by values of another type already violate "type"
        kinds = type_kinds(schema["type"])
        parts = [p for p in parts if not (isinstance(p, dict) and "type" in p and not type_kinds(p["type"]) & kinds)]
        add(_type_rule(schema["type"]))
    return Complement(any_of(parts), exact)


def _typed(kind_name: str, **keywords: Any) -> Schema:
    return {"type": kind_name, **keywords}


def _type_rule(types: Any) -> Complement:
    other = KINDS - type_kinds(types)
    schema = kinds_schema(other)
    if schema is not None:
        return Complement(schema, True)
    # Numbers that are not integers: no "type" says it, so they are left out.
    return Complement(kinds_schema(other - {"fraction"}) or False, False)


def not_values(values: list[Any]) -> Complement:
    """Every value but these."""
    present = {kind(v) for v in values}
    parts: list[Schema] = []
    exact = True
    rest = kinds_schema(KINDS - present - ({"integer", "fraction"} if present & {"integer", "fraction"} else set()))
    parts.append(rest if rest is not None else False)
    strings = sorted({v for v in values if isinstance(v, str)})
    if strings:
        pattern = not_strings_pattern(strings)
        parts.append(_typed("string", pattern=pattern) if pattern is not None else False)
        exact = exact and pattern is not None
    numbers = sorted({float(v) for v in values if kind(v) in ("integer", "fraction")})
    if numbers:
        bounds = [-math.inf, *numbers, math.inf]
        for low, high in zip(bounds, bounds[1:], strict=False):
            part: dict[str, Any] = {"type": "number"}
            if low != -math.inf:
                part["exclusiveMinimum"] = int(low) if low.is_integer() else low
            if high != math.inf:
                part["exclusiveMaximum"] = int(high) if high.is_integer() else high
            parts.append(part)
    parts += [{"const": b} for b in (True, False) if "boolean" in present and not any(v is b for v in values)]
    if present & {"object", "array"}:
        exact = False  # every object or array but some: not expressible, left out
    return Complement(any_of(parts), exact)


def _regex_char(c: str) -> str:
    return c if c.isascii() and c.isalnum() else f"\\u{ord(c):04x}"


def not_strings_pattern(words: list[str]) -> str | None:
    """A regular expression (ECMA 262, Rust and Python alike) for every string but `words`."""
    if any(ord(c) > 0xFFFF for w in words for c in w):
        return None
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for c in word:
            node = node.setdefault(c, {})
        node[""] = {}

    def alternatives(node: dict[str, Any]) -> str:
        children = sorted(c for c in node if c)
        alts = [] if "" in node else [""]
        if children:
            alts.append(f"[^{''.join(_regex_char(c) for c in children)}][\\s\\S]*")
            alts += [f"{_regex_char(c)}(?:{alternatives(node[c])})" for c in children]
        else:
            alts.append("[\\s\\S]+")
        return "|".join(alts)

    return f"^(?:{alternatives(trie)})$"


_CLASS_PATTERN = re.compile(r"^\^\[(\^?)((?:\\.|[^\]\\])+)\]([+*])\$$")


def not_pattern(pattern: str) -> str | None:
    """The strings a pattern of one character class, repeated, rejects ("^[...]+$", "^[...]*$")."""
    found = _CLASS_PATTERN.match(pattern)
    if found is None:
        return None
    negated, body, repeat = found.groups()
    other = f"[{body}]" if negated else f"[^{body}]"
    return f"^(?:[\\s\\S]*{other}[\\s\\S]*)$" if repeat == "*" else f"^(?:|[\\s\\S]*{other}[\\s\\S]*)$"


def _const(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    return not_values([value])


def _enum(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    return not_values(list(value)) if isinstance(value, list) else Complement(False, False)


def _required(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    return Complement(any_of([_typed("object", properties={r: False}) for r in value]), True)


def _properties(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    parts: list[Schema] = []
    exact = True
    for name, sub in value.items():
        c = complement(sub, resolve, depth + 1)
        exact = exact and c.exact
        if c.schema is not False:
            parts.append(_typed("object", required=[name], properties={name: c.schema}))
    return Complement(any_of(parts), exact)


def _bound(kind_name: str, opposite: str, offset: int) -> Any:
    def rule(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return Complement(False, False)
        if offset and value + offset < 0:
            return Complement(False, True)
        return Complement(_typed(kind_name, **{opposite: value + offset}), True)
    return rule


def _items(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    prefix: list[Any] = schema["prefixItems"] if isinstance(schema.get("prefixItems"), list) else []
    c = complement(value, resolve, depth + 1)
    if c.schema is False:
        return Complement(False, c.exact)
    # Some item fails: stated for the first item after the prefix only (JSON Schema has no "some item" that
    # llguidance compiles), so this complement is narrower than the true one.
    return Complement(_typed("array", minItems=len(prefix) + 1, prefixItems=[True] * len(prefix) + [c.schema]),
                      False)


def _prefix_items(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    parts: list[Schema] = []
    exact = True
    for i, sub in enumerate(value):
        c = complement(sub, resolve, depth + 1)
        exact = exact and c.exact
        if c.schema is not False:
            parts.append(_typed("array", minItems=i + 1, prefixItems=[True] * i + [c.schema]))
    return Complement(any_of(parts), exact)


def _all_of(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    cs = [complement(sub, resolve, depth + 1) for sub in value]
    return Complement(any_of([c.schema for c in cs]), all(c.exact for c in cs))


def _any_of(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    cs = [complement(sub, resolve, depth + 1) for sub in value]
    return Complement(all_of([c.schema for c in cs]), all(c.exact for c in cs))


def _one_of(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    none = _any_of(schema, value, resolve, depth)
    several = [all_of([x, y]) for x, y in combinations(value, 2) if not disjoint(x, y, resolve, depth + 1)]
    return Complement(any_of([none.schema, *several]), none.exact)


def _not(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    return Complement(value, True)


def _if(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    then, else_ = schema.get("then", True), schema.get("else", True)
    c_if, c_then, c_else = (complement(s, resolve, depth + 1) for s in (value, then, else_))
    return Complement(any_of([all_of([value, c_then.schema]), all_of([c_if.schema, c_else.schema])]),
                      c_if.exact and c_then.exact and c_else.exact)


def _nothing(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    return Complement(False, True)  # then/else: negated with "if"


def _dependent_required(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    return Complement(any_of([_typed("object", required=[name], properties={d: False})
                              for name, deps in value.items() for d in deps]), True)


def _dependent_schemas(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    cs = {name: complement(sub, resolve, depth + 1) for name, sub in value.items()}
    return Complement(any_of([all_of([_typed("object", required=[name]), c.schema]) for name, c in cs.items()]),
                      all(c.exact for c in cs.values()))


def _ref(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    target = resolve(value)
    return complement(target, resolve, depth + 1) if target is not None else Complement(False, False)


def _pattern(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    other = not_pattern(value) if isinstance(value, str) else None
    return Complement(_typed("string", pattern=other), True) if other is not None else Complement(False, False)


def _contains(schema: dict[str, Any], value: Any, resolve: Resolver, depth: int) -> Complement:
    if "minContains" in schema or "maxContains" in schema:
        return Complement(False, False)
    c = complement(value, resolve, depth + 1)
    return Complement(_typed("array", items=c.schema), c.exact)


_RULES: dict[str, Any] = {
    "const": _const, "enum": _enum, "required": _required, "properties": _properties,
    "minLength": _bound("string", "maxLength", -1), "maxLength": _bound("string", "minLength", 1),
    "minItems": _bound("array", "maxItems", -1), "maxItems": _bound("array", "minItems", 1),
    "minProperties": _bound("object", "maxProperties", -1), "maxProperties": _bound("object", "minProperties", 1),
    "minimum": _bound("number", "exclusiveMaximum", 0), "maximum": _bound("number", "exclusiveMinimum", 0),
    "exclusiveMinimum": _bound("number", "maximum", 0), "exclusiveMaximum": _bound("number", "minimum", 0),
    "items": _items, "prefixItems": _prefix_items, "allOf": _all_of, "anyOf": _any_of, "oneOf": _one_of,
    "not": _not, "if": _if, "then": _nothing, "else": _nothing, "dependentRequired": _dependent_required,
    "dependentSchemas": _dependent_schemas, "$ref": _ref, "pattern": _pattern, "contains": _contains,
}
