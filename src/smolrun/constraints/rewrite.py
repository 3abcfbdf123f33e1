"""Rewrite a JSON Schema into keywords llguidance enforces: exactly, or narrower where said, never looser."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from itertools import combinations
from typing import Any
from urllib.parse import unquote

from smolrun.constraints.formats import ALIASES, FORMATS, PATTERN_FORMATS, STRICT_FORMATS
from smolrun.constraints.logic import (
    KINDS,
    Resolver,
    Schema,
    all_of,
    any_of,
    complement,
    disjoint,
    facts,
    fails,
    kinds_schema,
    not_values,
    type_kinds,
    value_key,
)

Path = tuple[str, ...]
log = logging.getLogger("smolrun")

# An unknown format stays visible in the compiled schema under this key (llguidance ignores "x-" keys), so
# that the grammar built from it can say which formats it did not enforce.
IGNORED_FORMAT = "x-smolrun-ignored-format"
LATEST = "https://json-schema.org/draft/2020-12/schema"
MAX_BRANCHES = 64  # alternatives one rewrite may spell out (llguidance multiplies those of one object)

_DRAFTS = {"draft-03": 3, "draft-04": 4, "draft-06": 6, "draft-07": 7, "2019-09": 2019, "2020-12": 2020}
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SINGLES = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
            "unevaluatedProperties", "unevaluatedItems", "additionalItems")
# Keywords with no rewrite here: refused, never ignored.
REFUSED = ("unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef", "$dynamicAnchor",
           "$recursiveAnchor")


class Unsupported(Exception):
    """A keyword at `path` that cannot be enforced exactly (nor by a narrower schema)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Rewritten:
    schema: dict[str, Any]
    ignored_formats: tuple[str, ...]  # format names accepted without being enforced (annotations in 2020-12)
    approximations: tuple[str, ...]  # where the schema was narrowed: every value allowed is still valid


def draft_of(schema: dict[str, Any]) -> int | None:
    uri = schema.get("$schema")
    return next((n for name, n in _DRAFTS.items() if name in uri), None) if isinstance(uri, str) else None


def rewrite(schema: dict[str, Any]) -> Rewritten:
    """`schema` in the keywords llguidance compiles, read with the draft its `$schema` names (2020-12 without
    one, with the older forms that 2020-12 gives no meaning, like `items` as a list, read as draft 7 does)."""
    normal = normalize(schema, draft_of(schema), (), root=True, base=_base_uri(schema))
    assert isinstance(normal, dict)
    rewriter = _Rewriter(Resolver(None if _has_inner_ids(normal, True) else normal))
    rewritten = rewriter.node(normal, ())
    if isinstance(rewritten, dict):
        rewritten = _targets_outside_schemas(rewritten, normal, draft_of(schema), rewriter)
    if rewriter.resolve.root is not None:
        rewritten = _unfold_siblings(rewritten, Resolver(rewritten))
    out = rewritten if isinstance(rewritten, dict) else {"not": {}} if rewritten is False else {}
    return Rewritten({**out, "$schema": LATEST}, tuple(dict.fromkeys(rewriter.ignored)), tuple(rewriter.notes))


def _pointer(ref: Any) -> Path | None:
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return None
    return tuple(unquote(p).replace("~1", "/").replace("~0", "~") for p in ref[2:].split("/"))


def _refs(node: Any) -> list[Path]:
    found: list[Path] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            pointer = _pointer(item.get("$ref"))
            if pointer is not None:
                found.append(pointer)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _targets_outside_schemas(out: dict[str, Any], normal: dict[str, Any], draft: int | None,
                             rewriter: _Rewriter) -> dict[str, Any]:
    """References may point into any JSON under the root (say "#/definitions/group/name", where "group" is no
    schema): those targets are rewritten too, in place."""
    pending = [p for p in _refs(out) if p not in rewriter.visited]
    while pending:
        path = pending.pop()
        if path in rewriter.visited:
            continue
        rewriter.visited.add(path)
        source: Any = normal
        for part in path:
            source = source.get(part) if isinstance(source, dict) else None
        if not isinstance(source, dict | bool):
            continue  # a dangling reference: llguidance names it
        target = rewriter.node(normalize(source, draft, path), path)
        pending += [p for p in _refs(target) if p not in rewriter.visited]
        node: Any = out
        for part in path[:-1]:
            if not isinstance(node, dict) or not isinstance(node.get(part), dict):
                node = None
                break
            node[part] = dict(node[part])
            node = node[part]
        if isinstance(node, dict):
            node[path[-1]] = target
    return out


def ignored_formats(node: Any) -> tuple[str, ...]:
    """The format names a rewritten schema (or anything holding some) accepts without enforcing."""
    found: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get(IGNORED_FORMAT), str):
                found.append(item[IGNORED_FORMAT])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return tuple(sorted(set(found)))


# Keywords that say something about a value; every other key (annotations, definitions, unknown keys that a
# reference may point into) stays where it is when a node is split into alternatives.
_VALIDATION = frozenset({
    "type", "enum", "const", "anyOf", "oneOf", "allOf", "not", "if", "then", "else", "$ref", "properties",
    "required", "additionalProperties", "patternProperties", "minProperties", "maxProperties", "propertyNames",
    "dependentRequired", "dependentSchemas", "items", "prefixItems", "minItems", "maxItems", "uniqueItems",
    "contains", "minContains", "maxContains", "minLength", "maxLength", "pattern", "format", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})




def _validation(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k in _VALIDATION}


def _outside(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k not in _VALIDATION}


def _presence_alternatives(schema: Schema, node: dict[str, Any]) -> bool:
    """Whether `schema` is alternatives on which keys an object has, that can be merged into `node` exactly."""
    if not isinstance(schema, dict) or set(schema) != {"anyOf"}:
        return False
    props: dict[str, Any] = node["properties"] if isinstance(node.get("properties"), dict) else {}
    return all(isinstance(alt, dict) and set(alt) <= {"properties", "required", "minProperties", "maxProperties"}
               and all(v is False or k in props for k, v in (alt.get("properties") or {}).items())
               for alt in schema["anyOf"])


def _merge(node: dict[str, Any], alt: dict[str, Any]) -> dict[str, Any]:
    out = dict(node)
    props = dict(node.get("properties") or {})
    for name, sub in (alt.get("properties") or {}).items():
        props[name] = all_of([props[name], sub]) if name in props else sub
    if props:
        out["properties"] = props
    required = [*node.get("required", []), *[r for r in alt.get("required", []) if r not in node.get("required", [])]]
    if required:
        out["required"] = required
    if "minProperties" in alt:
        out["minProperties"] = max(alt["minProperties"], node.get("minProperties", 0))
    if "maxProperties" in alt:
        out["maxProperties"] = min(alt["maxProperties"], node.get("maxProperties", math.inf))
    return out


def _spread(node: dict[str, Any], groups: list[Schema], path: Path) -> dict[str, Any]:
    """The node as an anyOf of whole objects, one per combination of alternatives, so that llguidance has
    nothing to intersect (it cannot intersect a recursive reference)."""
    outside, branches = _outside(node), [_validation(node)]
    for group in groups:
        assert isinstance(group, dict)
        branches = [_merge(b, alt) for b in branches for alt in group["anyOf"]]
        if len(branches) > MAX_BRANCHES:
            raise Unsupported(path, f"the dependencies and property counts of this object need more than "
                                    f"{MAX_BRANCHES} alternatives")
    return {**outside, "anyOf": branches} if len(branches) > 1 else {**outside, **branches[0]}


def _unfold_siblings(node: Schema, resolve: Resolver) -> Schema:
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
    if "$ref" in out and len(set(out) - _ANNOTATIONS) > 1:
        siblings = {k: v for k, v in out.items() if k != "$ref"}
        out = {**siblings, "allOf": [*members, _unfold({"$ref": out["$ref"]}, siblings, resolve, 0)]}
        members = out["allOf"]
    for key in ("anyOf", "oneOf"):
        siblings = {k: v for k, v in out.items() if k not in (key, "allOf") and k not in _ANNOTATIONS}
        if isinstance(out.get(key), list) and (siblings or members):
            out[key] = [_unfold(branch, {"allOf": [siblings, *members]}, resolve, 0) for branch in out[key]]
    if len(members) > 1 or (members and set(out) - _ANNOTATIONS - {"allOf"}):
        unfolded = []
        for i, member in enumerate(members):
            others = [m for j, m in enumerate(members) if j != i] + [{k: v for k, v in out.items() if k != "allOf"}]
            unfolded.append(_unfold(member, {"allOf": others}, resolve, 0))
        merged: Schema = {k: v for k, v in out.items() if k != "allOf"}
        kept: list[Schema] = []
        for member in unfolded:
            both = _merge_objects(merged, member, resolve) if isinstance(merged, dict) else None
            if both is None:
                kept.append(member)
            else:
                merged = both
        if not isinstance(merged, dict):
            return merged
        out = {**merged, "allOf": kept} if kept else merged
    if isinstance(out.get("anyOf"), list):
        siblings = {k: v for k, v in _validation(out).items() if k != "anyOf"}
        if siblings:
            spread = [_merge_objects(siblings, branch, resolve) for branch in out["anyOf"]]
            if all(b is not None for b in spread):
                out = {**_outside(out),
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
    bare = _validation(sub) if isinstance(sub, dict) else sub
    new_props = dict(props)
    for name in matching:
        schema = props[name]
        same = isinstance(schema, dict) and _validation(schema) == bare
        new_props[name] = schema if same or schema is False else _intersect(schema, sub, resolve)
    return {**node, "properties": new_props, "patternProperties": {_names_but(chars, least, matching): sub}}


def _inline(schema: Schema, resolve: Resolver) -> Schema:
    if isinstance(schema, dict) and set(_validation(schema)) == {"$ref"}:
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
        if isinstance(y, dict) and set(_validation(y)) == {"anyOf"} and isinstance(y["anyOf"], list):
            return any_of([_intersect(x, branch, resolve, depth + 1) for branch in y["anyOf"]
                           if not disjoint(x, branch, resolve)])
    merged = _merge_objects(a, b, resolve, depth + 1)
    return merged if merged is not None else all_of([a, b])


def _merge_objects(a: Schema, b: Schema, resolve: Resolver, depth: int = 0) -> Schema | None:
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
    out = _validation(a)
    for key, value in b.items():
        if key not in _VALIDATION or key in ("properties", "required", "type", "allOf"):
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
    if key in _MAPS and isinstance(value, dict):
        return {name: _unfold_siblings(sub, resolve) for name, sub in value.items()}
    if key in _LISTS and isinstance(value, list):
        return [_unfold_siblings(sub, resolve) for sub in value]
    return _unfold_siblings(value, resolve) if key in _SINGLES else value


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


_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "$id", "id",
                          "definitions", "$defs", "deprecated", "readOnly", "writeOnly", IGNORED_FORMAT})


def _children(node: dict[str, Any]) -> list[tuple[str, str | None, Schema]]:
    out: list[tuple[str, str | None, Schema]] = []
    for key in _MAPS:
        if isinstance(node.get(key), dict):
            out += [(key, name, sub) for name, sub in node[key].items()]
    for key in _LISTS:
        if isinstance(node.get(key), list):
            out += [(key, str(i), sub) for i, sub in enumerate(node[key])]
    out += [(key, None, node[key]) for key in _SINGLES if isinstance(node.get(key), dict | bool)]
    return out


def _has_inner_ids(node: Schema, root: bool) -> bool:
    """Whether a subschema changes the base URI, which makes "#..." references point elsewhere."""
    if not isinstance(node, dict):
        return False
    ids = [node.get("$id"), node.get("id")]
    if not root and any(isinstance(i, str) and not i.startswith("#") for i in ids):
        return True
    return any(_has_inner_ids(sub, False) for _, _, sub in _children(node))


def _base_uri(schema: dict[str, Any]) -> str | None:
    """The root's own URI (its `$id`, or draft 4's `id`) without a fragment, where no subschema changes it:
    references to it are references into the schema itself."""
    uri = schema.get("$id", schema.get("id"))
    if not isinstance(uri, str) or not uri.split("#", 1)[0] or _has_inner_ids(schema, True):
        return None
    return uri.split("#", 1)[0]


_ANCHOR = re.compile(r"#([A-Za-z_][-A-Za-z0-9._]*)")


def normalize(node: Any, draft: int | None, path: Path, root: bool = False, base: str | None = None) -> Schema:
    """The same schema in 2020-12 keywords (draft 4 to 2019-09 forms translated, by the draft's rules); a
    reference through the root's own URI `base` made local."""
    if isinstance(node, bool):
        return node
    if not isinstance(node, dict):
        raise Unsupported(path, "a schema must be an object or a boolean")
    node = {k: v for k, v in node.items() if root or k != "$schema"}
    ref = node.get("$ref")
    if base is not None and isinstance(ref, str) and ref.split("#", 1)[0] == base:
        node["$ref"] = "#" + ref.partition("#")[2]
    for key in ("$id", "id"):  # drafts 4-7 name a subschema with a fragment id: 2020-12's $anchor
        anchor = _ANCHOR.fullmatch(node[key]) if isinstance(node.get(key), str) else None
        if anchor is not None and "$anchor" not in node:
            del node[key]
            node["$anchor"] = anchor.group(1)
    if "$ref" in node and draft is not None and draft <= 7:  # drafts 4-7: keywords beside $ref are ignored
        node = {k: v for k, v in node.items() if k in ("$ref", "definitions", "$defs", "$schema")}
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), bool):  # draft 4: a flag on minimum/maximum
            if node.pop(bound) and plain in node:
                node[bound] = node.pop(plain)
    if isinstance(node.get("items"), list):  # drafts before 2020-12: a list of items is a tuple
        node["prefixItems"] = node.pop("items")
        if "additionalItems" in node:
            node["items"] = node.pop("additionalItems")
    node.pop("additionalItems", None)  # without a tuple it has no effect (and no meaning in 2020-12)
    dependencies = node.pop("dependencies", None)
    if isinstance(dependencies, dict) and (draft is None or draft <= 7):
        for name, dep in dependencies.items():
            if not isinstance(dep, list | dict | bool):
                raise Unsupported((*path, "dependencies", name), "a dependency must be an array or a schema")
            key = "dependentRequired" if isinstance(dep, list) else "dependentSchemas"
            node[key] = {**node.get(key, {}), name: dep}
    for key, name, sub in _children(node):
        where = (*path, key) if name is None else (*path, key, name)
        value = normalize(sub, draft, where, base=base)
        if name is None:
            node[key] = value
        elif key in _LISTS:
            node[key] = [*node[key][: int(name)], value, *node[key][int(name) + 1:]]
        else:
            node[key] = {**node[key], name: value}
    return dict(node)


class _Rewriter:
    def __init__(self, resolve: Resolver) -> None:
        self.resolve = resolve
        self.visited: set[Path] = set()  # schemas rewritten where they stand
        self.context: Schema = True  # what the node being rewritten must satisfy besides itself
        self.ignored: list[str] = []
        self.notes: list[str] = []

    def note(self, path: Path, what: str) -> None:
        self.notes.append(f"{path!r}: {what}")
        log.info("schema narrowed at %r: %s", path, what)

    def node(self, node: Schema, path: Path, generated: bool = False, context: Schema = True) -> Schema:
        """`node` rewritten; `generated`: a schema made here, whose parts are named by the keyword's path;
        `context`: what else the same value must satisfy (the keywords beside an allOf or anyOf holding it)."""
        if not generated:
            self.visited.add(path)
        if isinstance(node, bool):
            return node
        node = dict(node)
        extra: list[Schema] = []
        outer, self.context = self.context, context
        try:
            for step in (self._format, self._dependencies, self._conditional, self._not, self._one_of,
                         self._unique_items, self._contains, self._property_names, self._count_properties):
                step(node, path, extra)
        finally:
            self.context = outer
        for key in REFUSED:
            if key in node:
                raise Unsupported(path, f"'{key}' is not permitted (smolrun cannot guarantee it during decoding)")
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _MAPS and isinstance(value, dict):
                out[key] = {name: self.node(sub, path if generated else (*path, key, name), generated)
                            for name, sub in value.items()}
            elif key in _LISTS and isinstance(value, list):
                around = all_of([context, {k: v for k, v in node.items() if k != key}]) if key in (
                    "allOf", "anyOf") else True
                out[key] = [self.node(sub, path if generated else (*path, key, str(i)), generated, around)
                            for i, sub in enumerate(value)]
            elif key in _SINGLES and isinstance(value, dict | bool):
                out[key] = self.node(value, path if generated else (*path, key), generated)
            else:
                out[key] = value
        mergeable = [e for e in extra if _presence_alternatives(e, out)]
        extra = [e for e in extra if e not in mergeable]
        if extra:
            out["allOf"] = [*out.get("allOf", []), *extra]
        return _spread(out, mergeable, path) if mergeable else out

    def generated(self, schema: Schema, path: Path) -> Schema:
        return self.node(schema, path, generated=True)

    def _format(self, node: dict[str, Any], path: Path, extra: list[Schema]) -> None:
        fmt = node.get("format")
        if fmt is None:
            return
        fmt = ALIASES.get(fmt, fmt) if isinstance(fmt, str) else fmt
        if fmt in STRICT_FORMATS and "pattern" not in node:
            node["pattern"] = STRICT_FORMATS[fmt]
            del node["format"]
        elif fmt in FORMATS:
            node["format"] = fmt
        elif fmt in PATTERN_FORMATS:
            del node["format"]
            if "pattern" in node:
                extra.append({"pattern": PATTERN_FORMATS[fmt]})
            else:
                node["pattern"] = PATTERN_FORMATS[fmt]
        else:
            del node["format"]
            node[IGNORED_FORMAT] = str(fmt)
            self.ignored.append(str(fmt))
            log.warning("format %r at %r is not enforced (an annotation: JSON Schema 2020-12 lets a validator "
                        "accept any string for a format it does not know)", fmt, path)

    def _known_absent(self, node: dict[str, Any], name: str) -> bool:
        props: dict[str, Any] = node["properties"] if isinstance(node.get("properties"), dict) else {}
        closed = node.get("additionalProperties") is False and not node.get("patternProperties")
        return props.get(name) is False or (closed and name not in props)

    def _dependencies(self, node: dict[str, Any], path: Path, extra: list[Schema]) -> None:
        required = list(node.get("required") or [])
        for name, deps in (node.pop("dependentRequired", None) or {}).items():
            missing = [d for d in deps if d not in required and d != name]
            if not missing or self._known_absent(node, name):
                continue
            if name in required:  # always present: its dependencies are always required
                required += missing
                node["required"] = required
                continue
            extra.append({"anyOf": [{"properties": {name: False}}, {"required": [name, *missing]}]})
        for name, sub in (node.pop("dependentSchemas", None) or {}).items():
            if sub is True or self._known_absent(node, name):
                continue
            rewritten = self.node(sub, (*path, "dependentSchemas", name))
            present = _merge_objects({"required": [name]}, rewritten, self.resolve)
            extra.append(rewritten if name in required else
                         any_of([{"properties": {name: False}}, present if present is not None else
                                 all_of([{"required": [name]}, rewritten])]))

    def _conditional(self, node: dict[str, Any], path: Path, extra: list[Schema]) -> None:
        cond, then, else_ = node.pop("if", None), node.pop("then", True), node.pop("else", True)
        if isinstance(node.get("allOf"), list) and self._switch(node, path, extra, cond, then, else_):
            return
        if cond is None or (then is True and else_ is True):
            return  # "then" and "else" mean nothing without "if", and "if" nothing without them
        extra.append(self._if_then_else(cond, then, else_, path))

    def _if_then_else(self, cond: Schema, then: Schema, else_: Schema, path: Path) -> Schema:
        negated = complement(cond, self.resolve)
        if not negated.exact:
            self.note((*path, "if"), "values that fail 'if' in ways no schema here can state take the 'then' "
                                     "branch or are not produced")
        branches = [all_of([self.node(cond, (*path, "if")), self.node(then, (*path, "then"))]),
                    all_of([self.generated(negated.schema, (*path, "if")), self.node(else_, (*path, "else"))])]
        return any_of(branches)

    def _switch(self, node: dict[str, Any], path: Path, extra: list[Schema], cond: Any, then: Any,
                else_: Any) -> bool:
        """allOf of if/then on one property's distinct values (a tagged union): one alternative per value, not
        the 2^n that the conditions would multiply into."""
        members: list[tuple[Path, dict[str, Any]]] = [((*path, "allOf", str(i)), m)
                                                      for i, m in enumerate(node["allOf"])]
        if cond is not None:
            members.append((path, {"if": cond, "then": then, "else": else_}))
        cases: list[tuple[Path, Schema, Schema, Schema, list[Any]]] = []
        rest: list[Schema] = []
        tag: str | None = None
        for where, member in members:
            test = member.get("if") if isinstance(member, dict) else None
            props = test.get("properties") if isinstance(test, dict) else None
            keys = set(member) - {"if", "then", "else", "title", "description", "$comment"} if isinstance(
                member, dict) else {""}
            if keys or not isinstance(test, dict) or not isinstance(props, dict) or len(props) != 1 or set(
                    test) - {"properties"}:
                rest.append(member)
                continue
            name, sub = next(iter(props.items()))
            values = facts(sub, self.resolve).values
            if values is None or (tag is not None and name != tag):
                rest.append(member)
                continue
            tag = name
            cases.append((where, sub, member.get("then", True), member.get("else", True), values))
        seen = [value_key(v) for *_, values in cases for v in values]
        if tag is None or len(cases) < 3 or len(seen) != len(set(seen)):
            return False
        if tag not in (node.get("required") or []) or node.get("type") != "object":
            self.note(path, f"objects without '{tag}' (for which every 'then' would apply) are not produced")
        branches: list[Schema] = []
        for i, (where, sub, then_i, _, _) in enumerate(cases):
            elses = [self.node(c[3], (*c[0], "else")) for j, c in enumerate(cases) if j != i]
            branches.append(all_of([{"type": "object", "required": [tag],
                                     "properties": {tag: self.node(sub, (*where, "if"))}},
                                    self.node(then_i, (*where, "then")), *elses]))
        others = not_values([v for *_, values in cases for v in values])
        if others.schema is not False:
            branches.append(all_of([{"type": "object", "required": [tag], "properties": {tag: others.schema}},
                                    *[self.node(c[3], (*c[0], "else")) for c in cases]]))
        node["allOf"] = rest
        if not rest:
            del node["allOf"]
        extra.append(any_of(branches))
        return True

    def _not(self, node: dict[str, Any], path: Path, extra: list[Schema]) -> None:
        if "not" not in node:
            return
        negated = complement(node.pop("not"), self.resolve)
        if not negated.exact:
            if disjoint({k: v for k, v in node.items()}, negated.schema, self.resolve):
                raise Unsupported(path, "'not' cannot be enforced: its complement is not expressible here "
                                        "(supported: not of const, enum, type, required, properties, bounds, "
                                        "and patterns of one character class)")
            self.note((*path, "not"), "only some of the values 'not' allows are produced")
        extra.append(self.generated(negated.schema, (*path, "not")))

    def _one_of(self, node: dict[str, Any], path: Path, extra: list[Schema]) -> None:
        branches = node.pop("oneOf", None)
        if not isinstance(branches, list):
            return
        around = all_of([self.context, {k: v for k, v in node.items() if k not in ("anyOf", "allOf")}])
        within = [all_of([around, b]) for b in branches]
        exclusive: list[Schema] = []
        for i, branch in enumerate(branches):
            parts = [self.node(branch, (*path, "oneOf", str(i)))]
            for j, other in enumerate(branches):
                if i == j or disjoint(within[i], within[j], self.resolve):
                    continue
                negated = complement(other, self.resolve)
                if not negated.exact:
                    if disjoint(within[i], negated.schema, self.resolve):
                        raise Unsupported(path, f"'oneOf' branches {min(i, j)} and {max(i, j)} may both match, and "
                                                f"smolrun cannot state the values of one that fail the other")
                    self.note((*path, "oneOf", str(i)), f"only some of its values that fail branch {j} are produced")
                parts.append(self.generated(negated.schema, (*path, "oneOf", str(j))))
            exclusive.append(all_of(parts))
        extra.append(any_of(exclusive) if len(exclusive) != 1 else exclusive[0])

    def _unique_items(self, node: dict[str, Any], path: Path, extra: list[Schema]) -> None:
        if node.pop("uniqueItems", False) is not True:
            return
        low: int = node["minItems"] if isinstance(node.get("minItems"), int) else 0
        high: float = node["maxItems"] if isinstance(node.get("maxItems"), int) else math.inf
        prefix = node.get("prefixItems") if isinstance(node.get("prefixItems"), list) else []
        items = node.get("items", True)
        if high <= 1:
            return
        if prefix and all(disjoint(a, b, self.resolve) for a, b in combinations(prefix, 2)) and (
                items is False or high <= len(prefix)):
            return
        domain = None if prefix else self._domain(items)
        if domain is not None:
            if len(domain) <= 1:
                node["maxItems"] = min(high, len(domain))
                return
            sizes = range(low, int(min(high, len(domain))) + 1)
            subsets = [s for n in sizes for s in combinations(domain, n)]
            if len(subsets) <= MAX_BRANCHES:
                self.note(path, "unique items from a finite set are produced in the order the schema lists them")
                extra.append(any_of([{"prefixItems": [all_of([items, {"const": v}]) for v in s], "items": False}
                                     for s in subsets]))
                return
        if low > 1:
            raise Unsupported(path, "'uniqueItems' with 'minItems' above 1 is enforced only for items from a "
                                    "small finite set")
        node["maxItems"] = 1
        self.note(path, "'uniqueItems': at most one item is produced")

    def _domain(self, items: Schema) -> list[Any] | None:
        f = facts(items, self.resolve)
        values = f.values
        if values is None and f.kinds <= {"boolean", "null"}:
            values = [v for v in (False, True, None) if ("null" if v is None else "boolean") in f.kinds]
        if values is None or any(fails(v, items, self.resolve) for v in values):
            return None
        return list({value_key(v): v for v in values}.values())

    def _contains(self, node: dict[str, Any], path: Path, extra: list[Schema]) -> None:
        if "contains" not in node:
            node.pop("minContains", None)
            node.pop("maxContains", None)
            return
        wanted, least = node.pop("contains"), node.pop("minContains", 1)
        if "maxContains" in node or not isinstance(least, int) or node.get("prefixItems"):
            raise Unsupported(path, "'contains' is enforced without 'maxContains' and 'prefixItems' only")
        if least == 0:
            return
        items = self.node(node.get("items", True), (*path, "items"))
        node["prefixItems"] = [all_of([items, self.node(wanted, (*path, "contains"))])] * least
        node["minItems"] = max(least, node.get("minItems", 0))
        self.note(path, "'contains': the matching items come first")

    def _property_names(self, node: dict[str, Any], path: Path, extra: list[Schema]) -> None:
        names = node.pop("propertyNames", True)
        if names is True:
            return
        props = dict(node.get("properties") or {})
        for name in props:
            verdict = _name_valid(name, names)
            if verdict is None:
                raise Unsupported(path, f"'propertyNames' cannot be checked against the property {name!r}")
            if not verdict:
                props[name] = False
        if props:
            node["properties"] = props
        if node.get("additionalProperties") is False and not node.get("patternProperties"):
            return
        pattern = _names_pattern(names)
        if pattern is None or node.get("patternProperties"):
            raise Unsupported(path, "'propertyNames' is enforced when it is a pattern, an enum or a const, on "
                                    "objects without 'patternProperties'")
        node["patternProperties"] = {pattern: node.get("additionalProperties", True)}
        node["additionalProperties"] = False
        if any(_name_valid(name, names) for name in props):
            self.note(path, "'propertyNames': listed properties matching it also satisfy 'additionalProperties'")

    def _count_properties(self, node: dict[str, Any], path: Path, extra: list[Schema]) -> None:
        low, high = node.get("minProperties"), node.get("maxProperties")
        if low is None and high is None:
            return
        props: dict[str, Any] = node["properties"] if isinstance(node.get("properties"), dict) else {}
        required = set(node.get("required") or [])
        optional = [p for p, sub in props.items() if p not in required and sub is not False]
        if not optional:
            return  # llguidance counts these itself
        low, high = low or 0, math.inf if high is None else high
        closed = node.get("additionalProperties") is False and not node.get("patternProperties")
        branches: list[Schema] = []
        if closed:
            del node["minProperties"]
            node.pop("maxProperties", None)
            least, most = max(0, low - len(required)), min(len(optional), high - len(required))
            if most < least:
                not_object = kinds_schema(KINDS - {"object"})
                extra.append(not_object if not_object is not None else False)
                return
            if most == len(optional):
                branches = [{"required": list(s)} for s in combinations(optional, least)]
            elif least == 0:
                branches = [{"properties": {o: False for o in optional if o not in s}}
                            for s in combinations(optional, int(most))]
            else:
                branches = [{"required": list(s), "properties": {o: False for o in optional if o not in s}}
                            for n in range(least, int(most) + 1) for s in combinations(optional, n)]
        else:  # extra keys count too: llguidance counts them once every listed key is required or forbidden
            node.pop("minProperties", None)
            node.pop("maxProperties", None)
            bounds = {"minProperties": low} | ({} if high == math.inf else {"maxProperties": high})
            branches = [{"required": list(s), "properties": {o: False for o in optional if o not in s}, **bounds}
                        for n in range(len(optional) + 1) for s in combinations(optional, n)]
        if len(branches) > MAX_BRANCHES:
            raise Unsupported(path, f"'minProperties'/'maxProperties' with {len(optional)} optional properties "
                                    f"would need {len(branches)} alternatives (at most {MAX_BRANCHES})")
        extra.append(any_of(branches))


_NAME_KEYS = frozenset({"pattern", "minLength", "maxLength", "enum", "const", "type", "title", "description"})


def _name_valid(name: str, schema: Schema) -> bool | None:
    """Whether a property name satisfies `propertyNames` (None: not known)."""
    if isinstance(schema, bool):
        return schema
    if set(schema) - _NAME_KEYS:
        return None
    resolve = Resolver(None)
    if fails(name, schema, resolve):
        return False
    pattern = schema.get("pattern")
    if pattern is not None:
        import re

        try:
            re.compile(pattern)
        except re.error:
            return None
    return True


def _names_pattern(schema: Schema) -> str | None:
    if not isinstance(schema, dict) or set(schema) - _NAME_KEYS or schema.get("type", "string") != "string":
        return None
    keys = set(schema) - {"type", "title", "description"}
    if keys == {"pattern"} and isinstance(schema["pattern"], str):
        return str(schema["pattern"])
    values = [schema["const"]] if keys == {"const"} else schema.get("enum") if keys == {"enum"} else None
    if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
        return "^(?:" + "|".join("".join(c if c.isalnum() else f"\\u{ord(c):04x}" for c in v) for v in values) + ")$"
    return None

