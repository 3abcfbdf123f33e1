"""The contract on real-world schemas, with a model: a JSON Schema in the request, a valid document back.

    python bench/contract.py [--threads 2] [--parallel 8] [--budgets 400,1200] [--limit N] [--log FILE]
                             [--out BENCHMARKS.md] [--resume]

Every schema of ../shared/data/jsonschemabench-sample (the section says so when it is absent) is sent as a
non-strict json_schema format, as such schemas come, with the prompt "Produce one example JSON document for this
schema." and the schema after it, greedy, with nothing else set (the repetition breaker and the closing at the
budget as they are by default), at each budget. Every answer is parsed and validated with `jsonschema` under the
schema's own draft (formats checked). Per subset: compiled or refused (by reason), finished by itself and valid,
closed at the budget and valid, not valid, not parseable; llguidance's own compile rates beside. Not a test: it
takes a while (about an hour per budget on 2 cores), and the outputs are the model's. With --log FILE --resume,
the answers already in FILE are read back rather than asked again, so an interrupted run goes on where it
stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from report import write_section
from schemas import BENCH_DATA, ROOT, Compiled, compile_corpus, refusal_reason, validators

from smolrun.config import Settings
from smolrun.constraints import check_schema
from smolrun.engine import Engine
from smolrun.errors import SmolrunError
from smolrun.turn import Done, Message, ResponseFormat, SamplingParams, TextDelta, Turn

PROMPT = "Produce one example JSON document for this schema."


@dataclass
class Outcome:
    kind: str  # finished | closed | cut | invalid | unparseable | refused | failed
    detail: str = ""
    tokens: int = 0


@dataclass
class Row:
    schemas: int = 0
    llg_default: int = 0
    llg_lenient: int = 0
    compiled: int = 0
    outcomes: dict[int, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))


def answer(engine: Engine, item: Compiled, budget: int) -> Outcome:
    """One request as a user sends it: the schema as given (non-strict), nothing else set."""
    prompt = f"{PROMPT}\n{json.dumps(item.schema)[:1500]}"
    try:
        fmt = ResponseFormat("json_schema", check_schema(item.schema, strict=False, what="response_format"),
                             "example", False)
        turn = Turn((Message("user", prompt),), fmt, SamplingParams(max_tokens=budget, temperature=0))
        parts: list[str] = []
        done: Done | None = None
        for event in engine.generate(engine.prepare(turn)):
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Done):
                done = event
    except SmolrunError as exc:
        kind = "refused" if exc.status == 400 else "failed"
        return Outcome(kind, refusal_reason(exc.message) if kind == "refused" else f"{type(exc).__name__}: {exc}")
    assert done is not None
    text = "".join(parts)
    try:
        document = json.loads(text)
    except ValueError:
        return Outcome("cut" if done.finish_reason == "length" and not done.stats.closed else "unparseable",
                       text[-120:], done.stats.completion_tokens)
    errors = [e.message for v in validators(item.schema) for e in v.iter_errors(document)]
    if errors:
        return Outcome("invalid", f"{errors[0][:120]} in {text[:160]!r}", done.stats.completion_tokens)
    if done.finish_reason == "stop":
        return Outcome("finished", "", done.stats.completion_tokens)
    return Outcome("closed", text[-160:], done.stats.completion_tokens)


def logged(path: Path) -> dict[tuple[int, str], Outcome]:
    """The outcomes an earlier run wrote with --log, by budget and schema."""
    out: dict[tuple[int, str], Outcome] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            out[(entry["budget"], entry["schema"])] = Outcome(entry["kind"], entry["detail"], entry["tokens"])
    return out


def run(engine: Engine, corpus: list[Compiled], budget: int, workers: int, log: IO[str] | None,
        known: dict[tuple[int, str], Outcome]) -> list[Outcome]:
    """Each compiled schema's outcome at this budget, in corpus order; those in `known` are not asked again."""
    compiled = [item for item in corpus if item.grammar is not None]
    out = {key(item): known[(budget, key(item))] for item in compiled if (budget, key(item)) in known}
    todo = [item for item in compiled if key(item) not in out]
    with ThreadPoolExecutor(workers) as pool:  # the batch engine decodes them together
        for item, outcome in zip(todo, pool.map(lambda item: answer(engine, item, budget), todo), strict=True):
            out[key(item)] = outcome
            if log is not None:
                log.write(json.dumps({"budget": budget, "schema": key(item), "kind": outcome.kind,
                                      "tokens": outcome.tokens, "detail": outcome.detail}) + "\n")
                log.flush()
            print(f"  max_tokens {budget}: {len(out)}/{len(compiled)}", end="\r", file=sys.stderr)
    print(file=sys.stderr)
    return [out[key(item)] for item in compiled]


def key(item: Compiled) -> str:
    return f"{item.subset}/{item.name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", default="400,1200", help="max_tokens values, comma-separated")
    parser.add_argument("--limit", type=int, default=0, help="the first N schemas of each subset (0: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--parallel", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--log", type=Path, help="also write every outcome here, one JSON object per line")
    parser.add_argument("--resume", action="store_true", help="read back the outcomes already in --log")
    args = parser.parse_args()
    if not BENCH_DATA.is_dir():
        write_section(args.out, "contract", f"## The contract on real-world schemas\n\n{BENCH_DATA} not found: "
                                            "not measured.")
        return
    budgets = [int(b) for b in args.budgets.split(",")]
    started = time.perf_counter()
    corpus = compile_corpus()
    if args.limit:
        seen: Counter[str] = Counter()
        corpus = [c for c in corpus if (seen.update([c.subset]) or seen[c.subset] <= args.limit)]
    engine = Engine.load(Settings(threads=args.threads, parallel=args.parallel, n_ctx=16384))
    if args.resume and args.log is None:
        parser.error("--resume reads the file that --log names")
    known = logged(args.log) if args.resume and args.log.exists() else {}
    with args.log.open("a" if args.resume else "w") if args.log else nullcontext() as log:
        results = {budget: run(engine, corpus, budget, args.parallel, log, known) for budget in budgets}
    compiled_items = [c for c in corpus if c.grammar is not None]

    rows: dict[str, Row] = defaultdict(Row)
    refusals: Counter[str] = Counter()
    for item in corpus:
        for key in (item.subset, "**all**"):
            row = rows[key]
            row.schemas += 1
            row.llg_default += item.llg_default
            row.llg_lenient += item.llg_lenient
            row.compiled += item.grammar is not None
        if item.grammar is None:
            refusals[item.refusal] += 1
    notes: list[str] = []
    for budget, outcomes in results.items():
        for item, outcome in zip(compiled_items, outcomes, strict=True):
            for key in (item.subset, "**all**"):
                rows[key].outcomes[budget][outcome.kind] += 1
            if outcome.kind == "refused":
                refusals[f"at max_tokens {budget}: {outcome.detail}"] += 1
            if outcome.kind in ("invalid", "unparseable", "cut", "failed"):
                notes.append(f"max_tokens {budget}, {item.subset}/{item.name}: {outcome.kind}: {outcome.detail}")

    head = "| subset | schemas | llguidance alone: defaults / lenient | smolrun compiles |"
    rule = "|---|---|---|---|"
    for budget in budgets:
        head += (f" {budget}: finished, valid | {budget}: closed at the budget, valid | "
                 f"{budget}: not valid / not parsed / cut |")
        rule += "---|---|---|"
    table = [head, rule]
    order = sorted(k for k in rows if k != "**all**") + ["**all**"]
    for key in order:
        row = rows[key]
        n = row.schemas
        cells = [key, str(n), f"{row.llg_default} / {row.llg_lenient}", f"{row.compiled} ({row.compiled / n:.0%})"]
        for budget in budgets:
            c = row.outcomes[budget]
            cells += [f"{c['finished']} ({c['finished'] / max(row.compiled, 1):.0%})", str(c["closed"]),
                      f"{c['invalid']} / {c['unparseable']} / {c['cut']}"]
        table.append("| " + " | ".join(cells) + " |")
    everything = rows["**all**"]
    headline = [f"at max_tokens {b}: {everything.outcomes[b]['finished']} of {everything.schemas} schemas "
                f"({everything.outcomes[b]['finished'] / everything.schemas:.0%}) answered with a complete valid "
                f"document, {everything.outcomes[b]['finished'] + everything.outcomes[b]['closed']} "
                f"({(everything.outcomes[b]['finished'] + everything.outcomes[b]['closed']) / everything.schemas:.0%})"
                f" with a valid one" for b in budgets]
    text = "\n".join(table)
    print(text)
    print("\n".join(headline))
    resumed = f" for this pass, with {len(known)} answers read back from the log of earlier passes" if known else ""
    doc = f"""## The contract on real-world schemas

Written by `python bench/contract.py --threads {args.threads} --parallel {args.parallel} --budgets {args.budgets}` in
{(time.perf_counter() - started) / 60:.0f} min{resumed}, on {platform.machine()} with {args.threads} threads,
{args.parallel} sequences decoded together, model `{engine.name}`: {everything.schemas} schemas of
`../shared/data/jsonschemabench-sample`, each sent as a non-strict json_schema format with the prompt
"{PROMPT}" and the schema after it, greedy, nothing else set (the repetition breaker and the closing at
the budget as they are by default). "Finished": finish_reason `stop`, valid, what `chat.completions.parse`
accepts. "Closed at the budget": finish_reason `length`, the document closed by the grammar's short way out,
valid. Every answer is checked with `jsonschema` under the schema's own draft, formats included. Per subset,
finished is a share of the schemas that compile.

{text}

Headline: {"; ".join(headline)}.

Refused (a 400 before decoding, by reason):

{chr(10).join(f"- {reason}: {count}" for reason, count in refusals.most_common())}
"""
    if notes:
        doc += "\nNot valid, not parsed, cut or failed:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    write_section(args.out, "contract", doc)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
