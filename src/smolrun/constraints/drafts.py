"""JSON Schema drafts read as 2020-12: a draft's own forms translated by its rules, references made local, and
the walks over a schema's subschemas that the rewrites share."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from smolrun.constraints.logic import Schema

Path = tuple[str, ...]


class Unsupported(Exception):
    """A keyword at `path` that cannot be enforced exactly (nor by a narrower schema)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


_DRAFTS = {"draft-03": 3, "draft-04": 4, "draft-06": 6, "draft-07": 7, "2019-09": 2019, "2020-12": 2020}
MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SINGLES = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
           "unevaluatedProperties", "unevaluatedItems", "additionalItems")


def draft_of(schema: dict[str, Any]) -> int | None:
    uri = schema.get("$schema")
    return next((n for name, n in _DRAFTS.items() if name in uri), None) if isinstance(uri, str) else None


def pointer(ref: Any) -> Path | None:
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return None
    return tuple(unquote(p).replace("~1", "/").replace("~0", "~") for p in ref[2:].split("/"))


def refs(node: Any) -> list[Path]:
    found: list[Path] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            target = pointer(item.get("$ref"))
            if target is not None:
                found.append(target)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def children(node: dict[str, Any]) -> list[tuple[str, str | None, Schema]]:
    out: list[tuple[str, str | None, Schema]] = []
    for key in MAPS:
        if isinstance(node.get(key), dict):
            out += [(key, name, sub) for name, sub in node[key].items()]
    for key in LISTS:
        if isinstance(node.get(key), list):
            out += [(key, str(i), sub) for i, sub in enumerate(node[key])]
    out += [(key, None, node[key]) for key in SINGLES if isinstance(node.get(key), dict | bool)]
    return out


def has_inner_ids(node: Schema, root: bool) -> bool:
    """Whether a subschema changes the base URI, which makes "#..." references point elsewhere."""
    if not isinstance(node, dict):
        return False
    ids = [node.get("$id"), node.get("id")]
    if not root and any(isinstance(i, str) and not i.startswith("#") for i in ids):
        return True
    return any(has_inner_ids(sub, False) for _, _, sub in children(node))


def base_uri(schema: dict[str, Any]) -> str | None:
    """The root's own URI (its `$id`, or draft 4's `id`) without a fragment, where no subschema changes it:
    references to it are references into the schema itself."""
    uri = schema.get("$id", schema.get("id"))
    if not isinstance(uri, str) or not uri.split("#", 1)[0] or has_inner_ids(schema, True):
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
    for key, name, sub in children(node):
        where = (*path, key) if name is None else (*path, key, name)
        value = normalize(sub, draft, where, base=base)
        if name is None:
            node[key] = value
        elif key in LISTS:
            node[key] = [*node[key][: int(name)], value, *node[key][int(name) + 1:]]
        else:
            node[key] = {**node[key], name: value}
    return dict(node)
