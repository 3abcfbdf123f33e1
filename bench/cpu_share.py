"""CPU sharing benchmark: decoding alone, beside a CPU-bound sandbox cell, and alone again.

    python bench/cpu_share.py [--threads 2] [--out BENCHMARKS.md]

Not a test: timings depend on the machine, so the three figures come from one run of one server. One
streamed 200-token chat on the bundled model, measured as decode tok/s (completion tokens after the first,
over the time after the first); beside it, one container runs a single-threaded busy loop through
`/v1/containers/{id}/exec`. Code in the sandbox runs niced and SCHED_BATCH (sandbox `Limits.nice`), so it
should take what the model leaves, not stall its threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from concurrency import free_port, wait_ready
from report import write_section

from smolrun.sandbox import Limits

ROOT = Path(__file__).resolve().parent.parent
TOKENS = 200
BUSY = "import time\nend = time.time() + {seconds}\nn = 0\nwhile time.time() < end:\n    n += 1\nn"


def decode_rate(url: str) -> float:
    """Decode tok/s of one streamed chat of TOKENS tokens: the tokens after the first over their time."""
    payload = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Write a long story about a cat."}],
               "max_tokens": TOKENS, "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}}
    first = 0.0
    tokens = 0
    with httpx.stream("POST", f"{url}/chat/completions", json=payload, timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and not first:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (tokens - 1) / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    port = free_port()
    data = Path(os.environ.get("TMPDIR", "/tmp")) / f"smolrun-bench-{port}"
    process = subprocess.Popen([sys.executable, "-m", "smolrun", "serve", "--port", str(port), "--threads",
                                str(args.threads), "--warm-containers", "1", "--data-dir", str(data)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(url, process)
        decode_rate(url)  # warm: weights paged in
        alone = decode_rate(url)
        container = httpx.post(f"{url}/containers", json={"name": "busy"}, timeout=60).json()["id"]
        busy_result: list[dict[str, object]] = []

        def busy() -> None:
            reply = httpx.post(f"{url}/containers/{container}/exec", timeout=600,
                               json={"code": BUSY.format(seconds=30), "timeout": 120})
            busy_result.append(reply.json())

        worker = threading.Thread(target=busy)
        worker.start()
        time.sleep(1.0)  # the cell is spinning before the chat starts
        beside = decode_rate(url)
        worker.join()
        after = decode_rate(url)
    finally:
        process.terminate()
        process.wait(timeout=60)
    loops = busy_result[0].get("result") if busy_result else None
    rows = ["| decoding | tok/s | share of alone |", "|---|---|---|",
            f"| alone | {alone:.1f} | 100 % |",
            f"| beside one CPU-bound cell | {beside:.1f} | {100 * beside / alone:.0f} % |",
            f"| alone again | {after:.1f} | {100 * after / alone:.0f} % |"]
    table = "\n".join(rows)
    print(table)
    section = f"""## Sharing the CPU with code

Written by `python bench/cpu_share.py --threads {args.threads}`, one run of one server: a streamed {TOKENS}-token
chat on the bundled model (temperature 0.7), its decode tok/s alone, while one container runs a single-threaded
busy loop for 30 s through `/v1/containers/{{id}}/exec` (it counted to {loops} meanwhile), and alone again.
Sandboxed code runs at nice {Limits().nice} with SCHED_BATCH, below the model's threads, which wait for each
other at every layer: a cell at the same priority took one of their cores and decoding fell to 12 % of alone
(9.4 against 78.9 tok/s, measured on 2 cores before this change).

{table}
"""
    write_section(args.out, "cpu-share", section)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
