"""The vLLM engine's cost: smolrun in front of vLLM against vLLM's own /v1/completions, same prompt and grammar.

    python bench/vllm.py [--out BENCHMARKS.md] [--model smollm2-135m]

Not a test: timings depend on the machine. One vLLM server (launched by smolrun's own code; vLLM's CPU build
where there is no GPU) serves both paths. Direct: streamed /v1/completions with the prompt's token ids and the
turn grammar that smolrun compiles for the request, as smolrun sends them. Through smolrun: a `smolrun serve
--backend vllm --vllm-url ...` process, streamed /v1/chat/completions with the json_schema. Each request i has
seed i on both paths, so both decode the same tokens. The replay (every returned token through the local
matcher) is timed apart, on the tokens the direct path returned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from concurrency import SCHEMA, TOPICS, free_port, wait_ready
from report import write_section

from smolrun.backends.decode import SequenceState
from smolrun.backends.vllm import VllmModel, completion_body
from smolrun.backends.vllm_server import VllmServer, model_location
from smolrun.config import Settings
from smolrun.engine import Engine
from smolrun.turn import Message, ResponseFormat, SamplingParams, Turn

ROOT = Path(__file__).resolve().parent.parent
LEVELS = (1, 4, 8)
TOTAL = 8
MAX_TOKENS = 64


@dataclass(frozen=True)
class Cell:
    tokens_per_s: float
    latency_p50: float


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} as JSON with a title, the city, a "
                                        "few facts and a rating from 1 to 5."}]


def chat_body(i: int) -> dict[str, object]:
    return {"model": "smollm2-135m", "messages": messages(i), "max_tokens": MAX_TOKENS, "temperature": 0.7,
            "seed": i, "stream": True, "stream_options": {"include_usage": True},
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA,
                                                                       "strict": True}}}


def direct_bodies(engine: Engine) -> list[dict[str, object]]:
    """What smolrun sends vLLM for chat_body(i), built by smolrun's own code."""
    assert isinstance(engine.model, VllmModel)
    bodies = []
    for i in range(TOTAL):
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, seed=i)
        turn = Turn(tuple(Message("user", m["content"]) for m in messages(i)),
                    ResponseFormat("json_schema", SCHEMA, "city", True), params)
        prepared = engine.prepare(turn)
        assert prepared.grammar is not None
        bodies.append(completion_body(engine.model, prepared.prompt, prepared.grammar.source, params, MAX_TOKENS))
    return bodies


async def one(client: httpx.AsyncClient, url: str, body: dict[str, object], tokens: list[int]) -> tuple[float, int]:
    """(latency s, completion tokens) of one streamed request; the direct path's token ids go into `tokens`."""
    started = time.perf_counter()
    count = 0
    async with client.stream("POST", url, json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or ():
                tokens += choice.get("token_ids") or []
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - started, count


async def measure(url: str, bodies: list[dict[str, object]], clients: int,
                  returned: list[list[int]] | None = None) -> Cell:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)
    results: list[tuple[float, int]] = []
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                tokens: list[int] = []
                results.append(await one(client, url, bodies[i], tokens))
                if returned is not None:
                    returned.append(tokens)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return Cell(sum(r[1] for r in results) / elapsed, statistics.median(r[0] for r in results))


def replay_us(engine: Engine, bodies: list[dict[str, object]], returned: list[list[int]]) -> float:
    """Microseconds per token to replay returned tokens through a fresh matcher of the same grammar."""
    params = SamplingParams(max_tokens=MAX_TOKENS)
    grammar = engine.prepare(Turn((Message("user", "x"),), ResponseFormat("json_schema", SCHEMA, "city", True),
                                  params)).grammar
    assert grammar is not None
    spent, count = 0.0, 0
    for tokens in returned:
        state = SequenceState(1, engine.model.n_ctx, params, grammar.matcher(), engine.model.eog_tokens,
                              engine.model.token_bytes)
        started = time.perf_counter()
        for token in tokens:
            if not state.done:
                state.replay(token)
                count += 1
        spent += time.perf_counter() - started
    return spent / max(count, 1) * 1e6


def device() -> str:
    if shutil.which("nvidia-smi"):
        reply = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True)
        if reply.returncode == 0 and reply.stdout.strip():
            return "GPU: " + reply.stdout.strip().splitlines()[0]
    return f"CPU ({os.cpu_count()} cores), vLLM's CPU build"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    data = Path.home() / ".cache" / "smolrun" / "bench-data"
    # Both paths send the same prompts: vLLM's prefix cache would favour whichever path runs second.
    settings = Settings(backend="vllm", model=args.model, n_ctx=2048, data_dir=data,
                        vllm_args=("--no-enable-prefix-caching",))
    location = model_location(args.model, settings)
    server = VllmServer(location, args.model, settings)
    try:
        url = server.start()
    except Exception as exc:  # noqa: BLE001 - no vLLM here: say so and leave the section alone
        sys.exit(f"bench/vllm.py: vLLM unavailable ({exc})")
    front: subprocess.Popen[bytes] | None = None
    try:
        engine = Engine.load(Settings(backend="vllm", model=location, n_ctx=2048, vllm_urls=(url,), data_dir=data))
        bodies = direct_bodies(engine)
        port = free_port()
        front = subprocess.Popen([str(ROOT / ".venv" / "bin" / "smolrun"), "serve", "--backend", "vllm", "--model",
                                  location, "--vllm-url", url, "--n-ctx", "2048", "--port", str(port),
                                  "--warm-containers", "0", "--data-dir", str(data / "front")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        smolrun_url = f"http://127.0.0.1:{port}/v1"
        wait_ready(smolrun_url, front)
        chats = [chat_body(i) for i in range(TOTAL)]
        asyncio.run(measure(f"{url}/v1/completions", bodies[:1], 1))  # warm both paths once
        asyncio.run(measure(f"{smolrun_url}/chat/completions", chats[:1], 1))
        rows = []
        returned: list[list[int]] = []
        for clients in LEVELS:
            direct = asyncio.run(measure(f"{url}/v1/completions", bodies, clients, returned))
            front_cell = asyncio.run(measure(f"{smolrun_url}/chat/completions", chats, clients))
            rows.append((clients, direct, front_cell))
            print(f"{clients} clients: vLLM {direct.tokens_per_s:.1f} tok/s p50 {direct.latency_p50:.2f} s; "
                  f"smolrun {front_cell.tokens_per_s:.1f} tok/s p50 {front_cell.latency_p50:.2f} s", flush=True)
        replay = replay_us(engine, bodies, returned)
    finally:
        if front is not None:
            front.terminate()
            front.wait()
        server.stop()
    lines = [
        "## vLLM engine (smolrun in front of vLLM)",
        "",
        f"`python bench/vllm.py`, on {device()}: {TOTAL} json_schema requests per row ({MAX_TOKENS} tokens at most, "
        "seed i for request i on both paths, so both decode the same tokens), one vLLM server launched by smolrun "
        "for the bundled model converted to safetensors, its prefix cache off (both paths send the same prompts). "
        "*vLLM* is its own `/v1/completions` given the prompt's "
        "token ids and the turn grammar that smolrun compiled; *smolrun* is `smolrun serve --backend vllm` in front "
        "of the same server (`/v1/chat/completions`, streamed). Target: the front adds at most 10 % to p50 latency "
        "and takes at most 10 % from throughput.",
        "",
        "| clients | vLLM tok/s | smolrun tok/s | throughput kept | vLLM p50 s | smolrun p50 s | p50 added |",
        "|---|---|---|---|---|---|---|",
    ]
    for clients, direct, front_cell in rows:
        kept = front_cell.tokens_per_s / direct.tokens_per_s
        added = front_cell.latency_p50 / direct.latency_p50 - 1
        lines.append(f"| {clients} | {direct.tokens_per_s:.1f} | {front_cell.tokens_per_s:.1f} | {kept:.0%} | "
                     f"{direct.latency_p50:.2f} | {front_cell.latency_p50:.2f} | {added:+.0%} |")
    lines += ["", f"Replaying the returned tokens through the local matcher: {replay:.0f} µs per token."]
    table = "\n".join(lines)
    print(table)
    write_section(args.out, "vllm", table)


if __name__ == "__main__":
    main()
