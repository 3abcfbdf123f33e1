"""Real-world schemas without a model: compile rates per subset, and whether what the grammars allow is valid.

    python bench/schemas.py [--docs 5] [--out BENCHMARKS.md]

Reads ../shared/data/jsonschemabench-sample (600 JSONSchemaBench schemas in 10 subsets) and says so when it is
absent. For each schema: does smolrun compile it (its checks and rewrites, then llguidance), and does llguidance
1.9 alone, with its defaults and with `lenient` (which ignores what it cannot compile). Then, for every schema
smolrun compiles, random documents drawn from its grammar (a random walk over the tokens the grammar allows,
byte by byte) are validated with `jsonschema` under the schema's own draft: none may be invalid.
The generation step (a model writing documents at a token budget) builds on `compile_corpus`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper
from report import write_section

from smolrun.constraints import check_schema
from smolrun.constraints.grammar import Grammar, GrammarCache
from smolrun.errors import SchemaError
from smolrun.turn import ResponseFormat

ROOT = Path(__file__).resolve().parent.parent
BENCH_DATA = ROOT.parent / "shared" / "data" / "jsonschemabench-sample"
EOS = 256
CLOSERS = frozenset(b'"]}0,')


class _Bytes:
    """llguidance's byte-level tokenizer: token i < 256 is byte i, 256 ends the sequence."""

    eos_token_id = EOS
    bos_token_id = None
    special_token_ids = [EOS]
    tokens = [bytes([i]) for i in range(256)] + [b"\xff<eos>"]

    def __call__(self, data: bytes | str) -> list[int]:
        return list(data.encode() if isinstance(data, str) else data)


def byte_tokenizer() -> LLTokenizer:
    return LLTokenizer(TokenizerWrapper(_Bytes()))


@dataclass(frozen=True)
class Compiled:
    subset: str
    name: str
    schema: dict[str, Any]  # as given
    grammar: Grammar | None  # None: smolrun refused it
    refusal: str  # why, grouped (empty when compiled)
    llg_default: bool
    llg_lenient: bool


def refusal_reason(message: str) -> str:
    """A refusal's reason without its path, schema name or the schema text, to group refusals."""
    found = re.search(r"In context=\(.*?\), (.+)", message)
    reason = found.group(1) if found else message.split("failed to compile JSON schema: ", 1)[-1]
    reason = reason.splitlines()[0]
    reason = re.sub(r"'(?:format|\$ref|pattern)' '[^']*'", lambda m: m.group(0).split(" ")[0], reason)
    reason = re.sub(r"branches \d+ and \d+", "branches", reason)
    return re.sub(r"[:(].*", "", reason).strip().rstrip(".")[:80]


def _llguidance_alone(schema: dict[str, Any], lenient: bool) -> bool:
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults={"lenient": True} if lenient else None)
        return not LLMatcher.validate_grammar(grammar)
    except Exception:  # a schema it cannot even read is one it does not compile
        return False


def compile_corpus(data: Path = BENCH_DATA) -> list[Compiled]:
    cache = GrammarCache(byte_tokenizer(), maxsize=1)
    out: list[Compiled] = []
    for path in sorted(data.glob("*/*.json")):
        schema = json.loads(path.read_text())
        grammar, refusal = None, ""
        try:
            checked = check_schema(schema, strict=False, what=path.name)
            grammar = cache.get(ResponseFormat("json_schema", checked, "s", False))
        except SchemaError as exc:
            refusal = refusal_reason(exc.message)
        out.append(Compiled(path.parent.name, path.name, schema, grammar, refusal,
                            _llguidance_alone(schema, False), _llguidance_alone(schema, True)))
    return out


def rate_table(results: list[Compiled]) -> list[str]:
    subsets: dict[str, list[Compiled]] = defaultdict(list)
    for r in results:
        subsets[r.subset].append(r)
    rows = ["| subset | schemas | smolrun | llguidance alone (defaults) | llguidance alone (lenient) |",
            "|---|---|---|---|---|"]

    def cells(group: list[Compiled]) -> str:
        n = len(group)
        counts = [sum(r.grammar is not None for r in group), sum(r.llg_default for r in group),
                  sum(r.llg_lenient for r in group)]
        return f"{n} | " + " | ".join(f"{c} ({c / n:.0%})" for c in counts)

    rows += [f"| {name} | {cells(group)} |" for name, group in sorted(subsets.items())]
    rows.append(f"| **all** | {cells(results)} |")
    reasons = Counter(r.refusal for r in results if r.grammar is None)
    rows += ["", "smolrun's refusals (400 before decoding), by reason:", ""]
    rows += [f"- {reason}: {count}" for reason, count in reasons.most_common()]
    return rows


def random_document(grammar: Grammar, rng: random.Random, max_bytes: int = 4000) -> str | None:
    """A document the grammar allows, drawn at random (closing bytes favoured so that most end); None when
    it has not ended within `max_bytes`."""
    matcher = grammar.matcher()
    out = bytearray()
    while len(out) < max_bytes:
        bits = np.unpackbits(np.frombuffer(bytes(matcher.compute_bitmask()), dtype=np.uint8), bitorder="little")
        allowed = [int(t) for t in np.flatnonzero(bits[:EOS + 1])]
        if EOS in allowed and (len(allowed) == 1 or rng.random() < 0.5):
            return out.decode()
        choices = [t for t in allowed if t != EOS]
        if not choices:
            raise AssertionError(f"the grammar allows nothing after {bytes(out)!r}")
        closers = [t for t in choices if t in CLOSERS]
        token = rng.choice(closers) if closers and rng.random() < 0.4 else rng.choice(choices)
        tokens = [token, *matcher.compute_ff_tokens()] if matcher.consume_token(token) else []
        if not tokens or matcher.is_error():
            raise AssertionError(f"the grammar rejected a token it allowed: {matcher.get_error()}")
        if len(tokens) > 1 and not matcher.consume_tokens(tokens[1:]):
            raise AssertionError("the grammar rejected its own forced tokens")
        out += bytes(tokens)
    return None


def validators(schema: dict[str, Any]) -> list[Any]:
    """Validators for the schema's own draft; without `$schema`, 2020-12 where the schema is valid there and
    draft 7 as well (smolrun reads older forms, like `items` as a list, the way draft 7 does)."""
    declared = "$schema" in schema
    classes = [jsonschema.validators.validator_for(schema)] if declared else []
    if not declared:
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
            classes.append(jsonschema.Draft202012Validator)
        except jsonschema.SchemaError:
            pass
        classes.append(jsonschema.Draft7Validator)
    return [cls(schema, format_checker=cls.FORMAT_CHECKER) for cls in classes]


def soundness(results: list[Compiled], docs: int, seed: int = 0) -> tuple[int, int, int, list[str]]:
    """Documents drawn, unfinished walks, invalid documents, and what was invalid."""
    drawn = unfinished = invalid = 0
    found: list[str] = []
    for i, r in enumerate(results):
        if r.grammar is None:
            continue
        checks = validators(r.schema)
        rng = random.Random(f"{seed}:{r.subset}/{r.name}")
        for _ in range(docs):
            text = random_document(r.grammar, rng)
            if text is None:
                unfinished += 1
                continue
            drawn += 1
            errors = [e for v in checks for e in v.iter_errors(json.loads(text))]
            if errors:
                invalid += 1
                found.append(f"{r.subset}/{r.name}: {errors[0].message[:120]} in {text[:200]!r}")
        print(f"  soundness {i + 1}/{len(results)}", end="\r", file=sys.stderr)
    return drawn, unfinished, invalid, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=5, help="random documents drawn per compiled schema")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    if not BENCH_DATA.is_dir():
        print(f"JSONSchemaBench sample not found at {BENCH_DATA}: nothing to measure.")
        return
    start = time.perf_counter()
    results = compile_corpus()
    table = rate_table(results)
    print("\n".join(table))
    drawn, unfinished, invalid, found = soundness(results, args.docs)
    sound = (f"{drawn} documents drawn from the {sum(r.grammar is not None for r in results)} compiled grammars "
             f"({args.docs} walks each, {unfinished} walks that had not ended within 4,000 bytes left out): "
             f"**{invalid} invalid**.")
    print(sound)
    print("\n".join(found))
    doc = f"""## Real-world schemas (no model)

Written by `python bench/schemas.py --docs {args.docs}` in {time.perf_counter() - start:.0f} s, on the
600 schemas of `../shared/data/jsonschemabench-sample` (60 per JSONSchemaBench subset). "smolrun" = accepted by
`check_schema` (non-strict: keywords rewritten, see README "Structured outputs") and compiled by llguidance;
"llguidance alone" = `LLMatcher.grammar_from_json_schema` on the schema as given, with its defaults and with
`lenient` (which ignores what it cannot compile, so compiles more but enforces less).

{chr(10).join(table)}

Soundness: random walks over the bytes each grammar allows, validated with `jsonschema` under the schema's own
draft (with format checks): {sound}
{chr(10).join(f"- {f}" for f in found)}
"""
    write_section(args.out, "schemas", doc)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
