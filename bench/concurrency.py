"""Concurrency benchmark: 1, 2, 4 and 8 clients on smolrun and on llama.cpp's own server, free text and json_schema.

    python bench/concurrency.py [--threads 2] [--parallel 8] [--model FILE.gguf] [--out BENCHMARKS.md]

Not a test: timings depend on the machine. Both servers run the same GGUF in their own process (the bundled
SmolLM2-135M; with --model another, such as the SmolLM3-3B-shaped one bench/make_3b.py builds, whose section
of BENCHMARKS.md is its own), with the same threads and the same number of parallel sequences (slots); the
clients (streaming /v1/chat/completions over HTTP) run in this one. llama.cpp's server is the PyPI package
`xllamacpp`, which this script installs into the running environment if it is missing (never a smolrun
dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from report import write_section

ROOT = Path(__file__).resolve().parent.parent
LEVELS = (1, 2, 4, 8)
MAX_TOKENS = 96
HOST_TARGET_MS = 0.5
CEILING_ROUNDS = 40  # alternating passes of 1 and of --parallel sequences measured for the ceiling
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "city", "facts", "rating"],
          "properties": {"title": {"type": "string", "maxLength": 60}, "city": {"type": "string", "maxLength": 30},
                         "facts": {"type": "array", "items": {"type": "string", "maxLength": 60}, "maxItems": 4},
                         "rating": {"type": "integer", "minimum": 1, "maximum": 5}}}
TOPICS = ("Paris", "Lyon", "Kyoto", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Sofia", "Hanoi", "Tunis", "Bern",
          "Accra", "Doha", "Riga", "Baku")
XLLAMACPP_SERVER = """
import sys, time, xllamacpp as x
p = x.CommonParams()
p.model.path, p.n_parallel, p.cont_batching, p.n_ctx = sys.argv[1], int(sys.argv[3]), True, 8192
p.cpuparams.n_threads = p.cpuparams_batch.n_threads = int(sys.argv[2])
p.port = int(sys.argv[4])
server = x.Server(p)
print(server.listening_address, flush=True)
while True:
    time.sleep(3600)
"""


@dataclass(frozen=True)
class Cell:
    tokens_per_s: float
    answers_per_s: float
    tokens_per_answer: float
    latency_p50: float
    latency_p99: float
    ttft_p50: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def body(workload: str, i: int, model: str = "smollm2-135m") -> dict[str, object]:
    topic = TOPICS[i % len(TOPICS)]
    if workload == "free text":
        messages = [{"role": "user", "content": f"Write a long travel story about {topic}."}]
        extra: dict[str, object] = {}
    else:
        messages = [{"role": "user", "content": f"Describe {topic} as JSON with a title, the city, a few facts "
                                                "and a rating from 1 to 5."}]
        extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA,
                                                                            "strict": True}}}
    return {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.7,
            "frequency_penalty": 0.5, "stream": True, "stream_options": {"include_usage": True}, **extra}


async def one(client: httpx.AsyncClient, url: str, payload: dict[str, object]) -> tuple[float, float, int]:
    """(latency s, time to first token s, completion tokens) of one streamed request."""
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    async with client.stream("POST", f"{url}/chat/completions", json=payload) as reply:
        reply.raise_for_status()
        buffer = b""
        async for data in reply.aiter_bytes():
            # Lines end at LF, as SSE says: aiter_lines would also cut at U+2028 and the like, which llama.cpp's
            # server writes raw when a (random-weight) model samples them.
            *lines, buffer = (buffer + data).split(b"\n")
            for raw in lines:
                line = raw.decode().rstrip("\r")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and not first:
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - started, first, tokens


async def measure(url: str, workload: str, clients: int, model: str, total: int = 8) -> Cell:
    """`clients` concurrent clients sending `total` requests, each client its next one as soon as one ends."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    results: list[tuple[float, float, int]] = []
    # No keep-alive: llama.cpp's HTTP server closes a connection after a few requests, and a request racing that
    # close fails; a fresh local connection per request costs both servers the same fraction of a millisecond.
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        async def worker() -> None:
            while not queue.empty():
                results.append(await one(client, url, body(workload, queue.get_nowait(), model)))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    return Cell(tokens / elapsed, len(results) / elapsed, tokens / len(results), statistics.median(latencies),
                latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                statistics.median(r[1] for r in results))


def median_cell(cells: list[Cell]) -> Cell:
    """Each measure's median over repeated runs of one cell."""
    return Cell(*(statistics.median(getattr(c, f) for c in cells) for f in Cell.__dataclass_fields__))


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server at {url} exited ({process.returncode})")
        try:
            if httpx.get(f"{url.removesuffix('/v1')}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"the server at {url} did not start")


def start_smolrun(threads: int, parallel: int, model: str,
                  interval_ms: int = 20) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    data = Path(os.environ.get("TMPDIR", "/tmp")) / f"smolrun-bench-{port}"
    process = subprocess.Popen([sys.executable, "-m", "smolrun", "serve", "--model", model, "--port", str(port),
                                "--threads", str(threads), "--parallel", str(parallel), "--warm-containers", "0",
                                "--stream-interval-ms", str(interval_ms), "--data-dir", str(data)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    wait_ready(url, process)
    return url, process


def start_llama_server(model: Path, threads: int, parallel: int) -> tuple[str, subprocess.Popen[bytes]]:
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "xllamacpp"], check=True)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", XLLAMACPP_SERVER, str(model), str(threads), str(parallel),
                                str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    wait_ready(url, process)
    return url, process


def pass_ceiling(model_path: Path, threads: int, parallel: int) -> tuple[float, float, float]:
    """Milliseconds of one decoding pass for 1 and for `parallel` sequences (one token and its logits each):
    how much batching can gain at most on this machine; and milliseconds per token of a 64-token prompt.

    The single sequence decodes in a context of its own: in one shared (unified) cache its pass would attend
    over every other sequence's cells too, as a lone client's never does. Passes of both contexts alternate,
    so that both see the same machine (its speed drifts by 10-20 % over minutes here), and medians over many
    rounds keep one slow pass out of the ratio."""
    from smolrun.backends.base import Feed
    from smolrun.backends.llama_cpp import LlamaCppModel

    alone = LlamaCppModel(model_path, name="alone", n_ctx=8192, n_threads=threads, n_seq=1)
    together = LlamaCppModel(model_path, name="together", n_ctx=8192, n_threads=threads, n_seq=parallel)
    prompt = list(range(1000, 1060))
    alone.decode([Feed(0, 0, prompt, True)])
    for seq in range(parallel):
        together.decode([Feed(seq, 0, prompt, True)])
    times: dict[int, list[float]] = {1: [], parallel: []}
    for round_ in range(3 + CEILING_ROUNDS):  # the first rounds warm up
        for n, model in ((1, alone), (parallel, together)):
            started = time.perf_counter()
            model.decode([Feed(seq, len(prompt) + round_, [1100], True) for seq in range(n)])
            if round_ >= 3:
                times[n].append((time.perf_counter() - started) * 1000)
    prompt_times = []
    for _ in range(5):
        alone.forget(0, 0)
        started = time.perf_counter()
        alone.decode([Feed(0, 0, prompt + prompt[:4], True)])
        prompt_times.append((time.perf_counter() - started) * 1000 / (len(prompt) + 4))
    alone.close()
    together.close()
    return statistics.median(times[1]), statistics.median(times[parallel]), statistics.median(prompt_times)


def host_work(threads: int, parallel: int, model_path: Path) -> dict[tuple[str, int], float]:
    """Milliseconds per generated token spent outside the forward pass (sampling, masks, penalties, the
    loop's bookkeeping), by workload and sequences decoded together: the batch loop in this process on the
    bench's model, with the bench's prompts and sampling, every pass of `model.decode` timed and subtracted."""
    from smolrun.backends.batch import BatchLoop
    from smolrun.config import Settings
    from smolrun.engine import Engine
    from smolrun.turn import Message, Reasoning, ResponseFormat, SamplingParams, Turn

    engine = Engine.load(Settings(threads=threads, parallel=parallel, n_ctx=8192), str(model_path))
    model = engine.model
    forward = model.decode
    in_forward = 0.0

    def timed(feeds: Any) -> Any:
        nonlocal in_forward
        started = time.perf_counter()
        try:
            return forward(feeds)
        finally:
            in_forward += time.perf_counter() - started

    model.decode = timed
    loop = BatchLoop(model)

    def run(workload: str, n: int) -> tuple[float, int]:
        jobs = []
        for i in range(n):
            payload = body(workload, i)
            messages = tuple(Message("user", str(m["content"])) for m in payload["messages"])  # type: ignore[attr-defined]
            fmt = ResponseFormat("json_schema", SCHEMA) if workload == "json_schema" else ResponseFormat()
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, frequency_penalty=0.5)
            turn = Turn(messages, fmt, params, reasoning=Reasoning("none"))
            jobs.append(engine.job(engine.prepare(turn), lambda _: None, lambda: False))
            loop.submit(jobs[-1])
        started = time.perf_counter()
        while loop.busy:
            loop.step()
        return time.perf_counter() - started, sum(j.state.generated for j in jobs)

    out = {}
    for workload in ("free text", "json_schema"):
        for n in (1, parallel):
            run(workload, n)  # warm: grammar compiled, prompts cached like a server's second request
            in_forward = 0.0
            wall, tokens = run(workload, n)
            out[(workload, n)] = (wall - in_forward) * 1000 / tokens
    engine.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the bundled SmolLM2-135M)")
    parser.add_argument("--repeat", type=int, default=3, help="measures of each cell on each server (medians)")
    parser.add_argument("--stream-interval-ms", type=int, default=20,
                        help="smolrun's --stream-interval-ms (20, its default; 0: a chunk per token, as llama.cpp's)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    from smolrun.models import resolve

    model = args.model.expanduser().resolve() if args.model else resolve("smollm2-135m", offline=True).path
    served = model.name if args.model else "smollm2-135m"  # the name smolrun serves a GGUF file under
    one_ms, many_ms, prompt_ms = pass_ceiling(model, args.threads, args.parallel)
    ceiling = args.parallel * one_ms / many_ms
    print(f"one pass: {one_ms:.1f} ms for 1 sequence, {many_ms:.1f} ms for {args.parallel}: at most {ceiling:.2f}x")
    host = host_work(args.threads, args.parallel, model)
    for (workload, n), ms in host.items():
        print(f"host work, {workload}, {n} sequences: {ms:.3f} ms per token")
    results: dict[tuple[str, str, int], Cell] = {}
    # Both servers stay up (an idle one takes no CPU) and each cell is measured on one, then the other, `--repeat`
    # times: the pairs see the same machine, whose speed drifts by 10-20 % over minutes here; medians are kept.
    servers: list[tuple[str, str, subprocess.Popen[bytes]]] = []
    try:
        url, process = start_smolrun(args.threads, args.parallel, str(model) if args.model else "smollm2-135m",
                                     args.stream_interval_ms)
        servers.append(("smolrun", url, process))
        url, process = start_llama_server(model, args.threads, args.parallel)
        servers.append(("llama.cpp server", url, process))
        for workload in ("free text", "json_schema"):
            for _, url, _ in servers:
                asyncio.run(measure(url, workload, 1, served, total=2))  # warm: weights paged in, grammar compiled
            for clients in LEVELS:
                runs: dict[str, list[Cell]] = {name: [] for name, _, _ in servers}
                for _ in range(args.repeat):
                    for name, url, _ in servers:
                        runs[name].append(asyncio.run(measure(url, workload, clients, served)))
                for name, cells in runs.items():
                    cell = results[(name, workload, clients)] = median_cell(cells)
                    print(f"{name:17} {workload:11} {clients} clients: {cell.tokens_per_s:6.1f} tok/s "
                          f"(runs: {', '.join(f'{c.tokens_per_s:.1f}' for c in cells)}), "
                          f"{cell.answers_per_s:.2f} answers/s of {cell.tokens_per_answer:.0f} tokens, "
                          f"p50 {cell.latency_p50:.2f} s, p99 {cell.latency_p99:.2f} s, "
                          f"ttft p50 {cell.ttft_p50 * 1000:.0f} ms", flush=True)
    finally:
        for _, _, process in servers:
            process.terminate()
            process.wait(timeout=30)

    rows = ["| server | workload | clients | aggregate output tok/s | answers/s | tokens per answer | "
            "p50 latency (s) | p99 latency (s) | p50 time to first token (ms) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for (name, workload, clients), cell in results.items():
        rows.append(f"| {name} | {workload} | {clients} | {cell.tokens_per_s:.1f} | {cell.answers_per_s:.2f} | "
                    f"{cell.tokens_per_answer:.0f} | {cell.latency_p50:.2f} | {cell.latency_p99:.2f} | "
                    f"{cell.ttft_p50 * 1000:.0f} |")
    answers = {k: v.answers_per_s for k, v in results.items()}
    ours = {k[1:]: v.tokens_per_s for k, v in results.items() if k[0] == "smolrun"}
    theirs = {k[1:]: v.tokens_per_s for k, v in results.items() if k[0] != "smolrun"}
    top = LEVELS[-1]
    ratios = [
        ("smolrun / llama.cpp server, free text tok/s at 1 client",
         ours[("free text", 1)] / theirs[("free text", 1)], 1.0),
        ("smolrun / llama.cpp server, free text tok/s at 8 clients",
         ours[("free text", top)] / theirs[("free text", top)], 1.0),
        ("smolrun / llama.cpp server, json_schema tok/s at 8 clients",
         ours[("json_schema", top)] / theirs[("json_schema", top)], 1.1),
        ("smolrun free text, 8 clients / 1 client, share of the ceiling",
         ours[("free text", top)] / ours[("free text", 1)] / ceiling, 0.9),
        ("smolrun json_schema, 8 clients / 1 client, share of the ceiling",
         ours[("json_schema", top)] / ours[("json_schema", 1)] / ceiling, 0.9),
        ("llama.cpp server free text, 8 clients / 1 client, share of the ceiling",
         theirs[("free text", top)] / theirs[("free text", 1)] / ceiling, None),
        ("smolrun / llama.cpp server, json_schema answers/s at 8 clients",
         answers[("smolrun", "json_schema", top)] / answers[("llama.cpp server", "json_schema", top)], None),
        ("smolrun / llama.cpp server, json_schema answers/s at 1 client",
         answers[("smolrun", "json_schema", 1)] / answers[("llama.cpp server", "json_schema", 1)], None),
    ]
    ratio_rows = ["| ratio | measured | target |", "|---|---|---|"]
    for label, value, target in ratios:
        share = "share" in label
        shown = f"{value:.0%}" if share else f"{value:.3f}x"
        goal = f"{target:.0%}" if share and target is not None else f"{target}x"
        verdict = "" if target is None else (f"at least {goal} (met)" if value >= target
                                             else f"at least {goal} (missed: {value / target - 1:+.1%})")
        ratio_rows.append(f"| {label} | {shown} | {verdict} |")
    limit = HOST_TARGET_MS
    host_rows = ["| workload | host ms per token, 1 sequence | host ms per token, "
                 f"{args.parallel} sequences |", "|---|---|---|"]
    for workload in ("free text", "json_schema"):
        host_rows.append(f"| {workload} | {host[(workload, 1)]:.3f} | {host[(workload, args.parallel)]:.3f} |")
    verdict = "met" if host[("free text", 1)] <= limit else "missed"
    host_table = "\n".join(host_rows)
    table, ratio_table = "\n".join(rows), "\n".join(ratio_rows)
    print(table + "\n\n" + ratio_table + "\n\n" + host_table)
    title, option, what = "Concurrency", "", "the bundled SmolLM2-135M Q4_1 GGUF"
    if args.stream_interval_ms != 20:
        option = f" --stream-interval-ms {args.stream_interval_ms}"
    if args.model:
        title, option = f"Concurrency on {model.name}", f"{option} --model {args.model}"
        what = (f"`{model.name}` ({model.stat().st_size / 2**30:.2f} GiB; the SmolLM3-3B-shaped Q4_K_M GGUF with "
                "random weights that `bench/make_3b.py` builds, when it is that file)")
    section = f"""## {title}

Written by `python bench/concurrency.py --threads {args.threads} --parallel {args.parallel}{option}`, one run,
each cell measured {args.repeat} times on each server in turn (both servers up, one idle while the other works),
medians shown:
{what}, {args.threads} CPU threads and {args.parallel} parallel sequences on both servers, each
in its own process. 8 streamed `/v1/chat/completions` requests per cell (up to {MAX_TOKENS} tokens, temperature
0.7, frequency_penalty 0.5), shared by 1-8 concurrent clients; aggregate tok/s = completion tokens
/ wall time, answers/s = requests / wall time. llama.cpp's server is `xllamacpp` (its own continuous batching
over slots and its own json_schema grammar, which lets the model write whitespace: its JSON answers are
longer, so they spread the cost of their prompts over more tokens). smolrun streams with
`--stream-interval-ms {args.stream_interval_ms}`: tokens that come within that many ms of its last chunk go out
with the next one (20 is its default; on this model a chunk carries 2-3 tokens), where llama.cpp's server
writes a chunk per token; the client, on the same CPUs, parses fewer chunks from smolrun.

One decoding pass (a token and its logits per sequence) takes {one_ms:.1f} ms for 1 sequence (alone in its cache, as
a lone client's is) and {many_ms:.1f} ms for {args.parallel} (medians of {CEILING_ROUNDS} alternating passes each) on
this machine, so decoding {args.parallel} sequences together yields at most **{ceiling:.2f}x** the tokens of one;
prompts, sampling and requests that end early take from that. A prompt costs
{prompt_ms:.1f} ms a token (64 tokens in one pass): here a pass is bound by arithmetic past a few tokens, so
the json_schema workload, whose 54-token prompts are about twice its answers, gains least from batching.

{table}

{ratio_table}

Host work per token, the time outside the forward pass (sampling, grammar masks, penalties, the loop's
bookkeeping) over the tokens generated, measured on the batch loop in this process with the same prompts and
sampling (every `model.decode` timed and subtracted; the HTTP side runs on other threads and is not in it).
Target: at most {limit} ms at 1 sequence for free text at temperature 0.7 ({verdict}).

{host_table}
"""
    write_section(args.out, "concurrency" if not args.model else f"concurrency-{model.stem}", section)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
