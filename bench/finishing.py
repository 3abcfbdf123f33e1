"""Do structured answers finish? Real-world schemas with the DRY breaker on, off, or frequency_penalty instead; the
breaker's cost per token; the closing search's cost. Prints tables and rewrites BENCHMARKS.md.

    python bench/finishing.py [--threads 2] [--schemas 100] [--out BENCHMARKS.md]

Not a test: timings depend on the machine. The schemas are ../shared/data/jsonschemabench-sample (the section
says so when it is absent); outputs are greedy, so the finish rates repeat from run to run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from report import write_section
from structured import BENCH_DATA, ROOT, pct, valid

from smolrun.backends.closing import Closer, shortest_close
from smolrun.backends.repetition import DRY_ALLOWED_LENGTH, DRY_BASE, Dry
from smolrun.config import Settings
from smolrun.constraints import check_schema
from smolrun.engine import Engine
from smolrun.errors import SmolrunError
from smolrun.turn import Done, Message, ResponseFormat, SamplingParams, TextDelta, Turn

PROMPT = "Produce one example JSON document for this schema."
MAX_TOKENS = 400
CONFIGS: list[tuple[str, dict[str, float]]] = [
    ("breaker off", {"dry_multiplier": 0.0}),
    ("frequency_penalty 0.5, breaker off", {"dry_multiplier": 0.0, "frequency_penalty": 0.5}),
    ("breaker on (the default)", {}),
]


@dataclass
class Tally:
    finished: int = 0  # ended by itself (finish_reason stop), valid
    closed: int = 0  # cut by max_tokens, closed there, valid
    invalid: int = 0  # not valid: a bug, listed
    failed: int = 0  # an error
    tokens: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    close_us: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def compiled(engine: Engine) -> list[tuple[str, dict[str, Any], ResponseFormat]]:
    out = []
    for path in sorted(BENCH_DATA.glob("*/*.json")):
        schema = json.loads(path.read_text())
        try:
            fmt = ResponseFormat("json_schema", check_schema(schema, strict=False, what=path.name), "s", False)
            engine.grammars.get(fmt)
        except SmolrunError:
            continue
        out.append((f"{path.parent.name}/{path.name}", schema, fmt))
    return out


def answer(engine: Engine, schema: dict[str, Any], fmt: ResponseFormat, **params: float) -> tuple[str, Done]:
    prompt = f"{PROMPT}\n{json.dumps(schema)[:1500]}"
    turn = Turn((Message("user", prompt),), fmt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, **params))
    parts: list[str] = []
    done: Done | None = None
    for event in engine.generate(engine.prepare(turn)):
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, Done):
            done = event
    assert done is not None
    return "".join(parts), done


def finish_rates(engine: Engine, sample: list[tuple[str, dict[str, Any], ResponseFormat]],
                 workers: int) -> dict[str, Tally]:
    tallies: dict[str, Tally] = {}
    for label, params in CONFIGS:
        tally = tallies[label] = Tally()

        def one(item: tuple[str, dict[str, Any], ResponseFormat], params: dict[str, float] = params) -> tuple[
                str, dict[str, Any], str, Done | Exception]:
            name, schema, fmt = item
            try:
                text, done = answer(engine, schema, fmt, **params)
            except SmolrunError as exc:
                return name, schema, "", exc
            return name, schema, text, done

        with ThreadPoolExecutor(workers) as pool:  # the batch engine decodes them together
            for i, (name, schema, text, done) in enumerate(pool.map(one, sample)):
                print(f"  {label}: {i + 1}/{len(sample)}", end="\r", file=sys.stderr)
                if isinstance(done, Exception):
                    tally.failed += 1
                    tally.notes.append(f"{name}: {type(done).__name__}: {done}")
                    continue
                tally.tokens.append(done.stats.completion_tokens)
                tally.rates.append(done.stats.completion_tokens / max(done.stats.decode_s, 1e-9))
                tally.close_us += done.stats.close_us
                if valid(text, schema) is not True:
                    tally.invalid += 1
                    tally.notes.append(f"{name}: INVALID ({done.finish_reason}) {text[-80:]!r}")
                elif done.finish_reason == "stop":
                    tally.finished += 1
                else:
                    tally.closed += 1
        print(file=sys.stderr)
    return tallies


def sampler_cost(engine: Engine, fmt: ResponseFormat, history: int = MAX_TOKENS, steps: int = 2000) -> float:
    """Microseconds per token of the new work the sampler does in a JSON answer: the breaker (one token added,
    the vocabulary's logits penalised) over a history of `history` tokens that loops, the case where it has the
    most to do, and the lean towards the end of the innermost value, past the point where it starts."""
    model = engine.model
    grammar = engine.grammars.get(fmt)
    closing = engine._closing(Turn((), fmt), grammar, None, False, False)
    assert grammar is not None and closing is not None
    closer = Closer(grammar.matcher(), closing)
    closer.scan.feed(b'{"a": "')  # inside a string: the lean raises every token that starts with a quote
    dry = Dry(engine.dry_multiplier, DRY_BASE, DRY_ALLOWED_LENGTH, model.token_bytes)
    loop = model.tokenize("the quick brown fox jumps over the lazy dog and " * 40)[:history]
    dry.add(loop)
    logits = np.zeros(model.n_vocab, dtype=np.float32)
    started = time.perf_counter()
    for i in range(steps):
        dry.apply(logits)
        closer.lean(logits, history // 4, history)
        dry.add([loop[i % len(loop)]])
    return (time.perf_counter() - started) / steps * 1e6


def single_step_ms(engine: Engine, tokens: int = 128) -> float:
    """Milliseconds per token of one free-text sequence decoding alone: the fastest step, so the strictest
    yardstick for the sampler's added work."""
    turn = Turn((Message("user", "Write a long story about a lighthouse."),),
                params=SamplingParams(max_tokens=tokens, temperature=0))
    done = next(e for e in engine.generate(engine.prepare(turn)) if isinstance(e, Done))
    return done.stats.decode_s / max(done.stats.completion_tokens - 1, 1) * 1000


def admission_cost(engine: Engine, schemas: list[tuple[str, dict[str, Any], ResponseFormat]]) -> tuple[
        list[float], list[int]]:
    """The closing search from each grammar's start (the admission check): milliseconds, and tokens found."""
    times, sizes = [], []
    for _, _, fmt in schemas:
        grammar = engine.grammars.get(fmt)
        assert grammar is not None
        closing = engine._closing(Turn((), fmt), grammar, None, False, False)
        assert closing is not None
        started = time.perf_counter()
        plan = shortest_close(grammar.matcher(), closing.scan(), closing, limit=engine.model.n_ctx)
        times.append((time.perf_counter() - started) * 1000)
        sizes.append(len(plan) if plan is not None else -1)
    return times, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--schemas", type=int, default=100, help="schemas to answer, evenly spaced")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    if not BENCH_DATA.is_dir():
        write_section(args.out, "finishing", f"## Structured answers finish\n\n{BENCH_DATA} not found: not measured.")
        return
    engine = Engine.load(Settings(threads=args.threads))
    schemas = compiled(engine)
    step = max(1, len(schemas) // args.schemas)
    sample = schemas[::step][: args.schemas]
    tallies = finish_rates(engine, sample, workers=engine.model.n_seq if engine.batches else 1)  # type: ignore[union-attr]
    rows = ["| decoding | finished by itself, valid | cut at max_tokens, closed there, valid | not valid | "
            "errors | tokens p50 / p90 | decode tok/s (median) |", "|---|---|---|---|---|---|---|"]
    for label, t in tallies.items():
        n = len(sample)
        rows.append(f"| {label} | **{t.finished} ({t.finished / n:.0%})** | {t.closed} | {t.invalid} | {t.failed} | "
                    f"{pct(t.tokens, 50):.0f} / {pct(t.tokens, 90):.0f} | {statistics.median(t.rates):.0f} |")
    per_token = sampler_cost(engine, sample[0][2])
    step_ms = single_step_ms(engine)
    times, sizes = admission_cost(engine, schemas)
    near = [us / 1000 for t in tallies.values() for us in t.close_us]
    found = [s for s in sizes if s >= 0]
    notes = [n for t in tallies.values() for n in t.notes]
    text = "\n".join(rows)
    print(text)
    doc = f"""## Structured answers finish

Written by `python bench/finishing.py --threads {args.threads} --schemas {args.schemas}`, one run, on
{platform.machine()} with {args.threads} threads, model `{engine.name}`, greedy, at most {MAX_TOKENS} tokens,
prompt "{PROMPT}" followed by the schema; {len(sample)} of the {len(schemas)} schemas of
`../shared/data/jsonschemabench-sample` that compile, evenly spaced. "Finished by itself": finish_reason
`stop` and valid (`jsonschema`, formats checked). Every answer cut by max_tokens is closed there by the
grammar's shortest way out, so it is valid too (finish_reason still `length`). The breaker is the DRY penalty
(multiplier {engine.dry_multiplier}, base {DRY_BASE}, allowed length {DRY_ALLOWED_LENGTH}; backends/repetition.py).
Tokens/s differ between rows mostly because the outputs differ.

{text}

Cost of the sampler's new work in a JSON answer: **{per_token:.0f} us per token** (the breaker: one token
added, the {engine.model.n_vocab:,}-token vocabulary penalised, over a {MAX_TOKENS}-token history that loops; and
the lean), **{per_token / 10 / step_ms:.1f} %** of this run's {step_ms:.1f} ms step of one free-text sequence
decoding alone, the fastest step there is.

Cost of the closing search (backends/closing.py): from each grammar's start, as at admission, on all
{len(schemas)} compiled schemas: p50 {pct(times, 50):.2f} ms, p90 {pct(times, 90):.2f}, p99 {pct(times, 99):.1f},
max {max(times):.0f} ms; it found a closing for {len(found)} of them (p50 {pct(found, 50):.0f} tokens, max
{max(found)}). Near the budget, during the runs above ({len(near)} searches, only within
2 x closing + 64 tokens of the end): p50 {pct(near, 50):.2f} ms, p99 {pct(near, 99):.1f} ms.
"""
    if notes:
        doc += "\nNot valid or failed:\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    write_section(args.out, "finishing", doc)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
