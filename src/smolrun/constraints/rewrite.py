"""Rewrite a JSON Schema into keywords llguidance enforces: exactly, or narrower where said, never looser."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from smolrun.constraints.drafts import (
    LISTS,
    MAPS,
    SINGLES,
    Path,
    Unsupported,
    base_uri,
    draft_of,
    has_inner_ids,
    normalize,
    refs,
)
from smolrun.constraints.formats import ALIASES, FORMATS, IGNORED_FORMAT, PATTERN_FORMATS, STRICT_FORMATS
from smolrun.constraints.intersect import merge_objects, outside, unfold_siblings, validation
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
    value_key,
)

log = logging.getLogger("smolrun")
LATEST = "https://json-schema.org/draft/2020-12/schema"
MAX_BRANCHES = 64  # alternatives one rewrite may spell out (llguidance multiplies those of one object)


# Keywords with no rewrite here: refused, never ignored.
REFUSED = ("unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef", "$dynamicAnchor",
           "$recursiveAnchor")


@dataclass(frozen=True)
class Rewritten:
    schema: dict[str, Any]
    ignored_formats: tuple[str, ...]  # format names accepted without being enforced (annotations in 2020-12)
    approximations: tuple[str, ...]  # where the schema was narrowed: every value allowed is still valid


def rewrite(schema: dict[str, Any]) -> Rewritten:
    """`schema` in the keywords llguidance compiles, read with the draft its `$schema` names (2020-12 without
    one, with the older forms that 2020-12 gives no meaning, like `items` as a list, read as draft 7 does)."""
    normal = normalize(schema, draft_of(schema), (), root=True, base=base_uri(schema))
    assert isinstance(normal, dict)
    rewriter = _Rewriter(Resolver(None if has_inner_ids(normal, True) else normal))
    rewritten = rewriter.node(normal, ())
    if isinstance(rewritten, dict):
        rewritten = _targets_outside_schemas(rewritten, normal, draft_of(schema), rewriter)
    if rewriter.resolve.root is not None:
        rewritten = unfold_siblings(rewritten, Resolver(rewritten))
    out = rewritten if isinstance(rewritten, dict) else {"not": {}} if rewritten is False else {}
    return Rewritten({**out, "$schema": LATEST}, tuple(dict.fromkeys(rewriter.ignored)), tuple(rewriter.notes))


def _targets_outside_schemas(out: dict[str, Any], normal: dict[str, Any], draft: int | None,
                             rewriter: _Rewriter) -> dict[str, Any]:
    """References may point into any JSON under the root (say "#/definitions/group/name", where "group" is no
    schema): those targets are rewritten too, in place."""
    pending = [p for p in refs(out) if p not in rewriter.visited]
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
        pending += [p for p in refs(target) if p not in rewriter.visited]
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
    kept, branches = outside(node), [validation(node)]
    for group in groups:
        assert isinstance(group, dict)
        branches = [_merge(b, alt) for b in branches for alt in group["anyOf"]]
        if len(branches) > MAX_BRANCHES:
            raise Unsupported(path, f"the dependencies and property counts of this object need more than "
                                    f"{MAX_BRANCHES} alternatives")
    return {**kept, "anyOf": branches} if len(branches) > 1 else {**kept, **branches[0]}


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
            if key in MAPS and isinstance(value, dict):
                out[key] = {name: self.node(sub, path if generated else (*path, key, name), generated)
                            for name, sub in value.items()}
            elif key in LISTS and isinstance(value, list):
                around = all_of([context, {k: v for k, v in node.items() if k != key}]) if key in (
                    "allOf", "anyOf") else True
                out[key] = [self.node(sub, path if generated else (*path, key, str(i)), generated, around)
                            for i, sub in enumerate(value)]
            elif key in SINGLES and isinstance(value, dict | bool):
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
            present = merge_objects({"required": [name]}, rewritten, self.resolve)
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
