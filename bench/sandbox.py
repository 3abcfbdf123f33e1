"""Sandbox benchmark: container start, warm pool, call round trip, each beside plain `python3 -c`.

    python bench/sandbox.py [--out BENCHMARKS.md]

Not a test: timings depend on the machine. Needs the sandbox (`make setup` as root); says so when absent.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report import write_section

from smolrun.sandbox import Container, WarmPool, default_config, unavailable_reason

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def p50(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    config = default_config()
    reason = unavailable_reason(config)
    if reason is not None:
        sys.exit(f"sandbox unavailable, nothing measured: {reason}")
    python = str(config.python)

    plain_print = timed(lambda: subprocess.run([python, "-c", "print(1+1)"], check=True, capture_output=True), 20)
    plain_pandas = timed(lambda: subprocess.run([python, "-c", "import pandas, matplotlib.pyplot"], check=True,
                                                capture_output=True), 5)

    def cold(preload: tuple[str, ...]) -> None:
        Container(config, preload=preload).start().close()

    cold_bare = timed(lambda: cold(()), 10)
    cold_pandas = timed(lambda: cold(("numpy", "pandas", "matplotlib", "matplotlib.pyplot")), 5)

    pool = WarmPool(config, size=1)
    warm: list[float] = []
    for _ in range(10):
        while pool.ready() < 1:  # let the pool refill, untimed, as between two real requests
            time.sleep(0.05)
        start = time.perf_counter()
        container = pool.acquire()
        container.run("pass")  # ready means it answers
        warm.append((time.perf_counter() - start) * 1000)
        container.close()
    pool.close()

    box = Container(config, preload=()).start()
    box.run("1 + 1")
    round_trip = timed(lambda: box.run("1 + 1"), 200)
    box.close()

    # Hostile code that tries to make 30,000 files: the quota stops it, and removing the container stays cheap.
    flood = "import os\ntry:\n    for i in range(30000): open(f'f{i}', 'w').close()\nexcept OSError: pass"

    def flood_and_clean() -> None:
        box = Container(config, preload=()).start()
        box.run(flood)
        box.close()

    quota_box = Container(config, preload=()).start()
    quota_mode = "quota tmpfs" if quota_box._tmpfs else "bounded walk"
    quota_box.close()
    flooded = timed(flood_and_clean, 3)

    rows = [
        "| measurement | p50 (ms) | beside |",
        "|---|---|---|",
        f"| plain `python3 -c 'print(1+1)'` (no sandbox) | {p50(plain_print):.1f} | |",
        f"| plain `python3 -c 'import pandas, matplotlib.pyplot'` | {p50(plain_pandas):.0f} | |",
        f"| cold container start, worker ready | {p50(cold_bare):.0f} | "
        f"{p50(cold_bare) / p50(plain_print):.1f}x plain python |",
        f"| cold container start with numpy, pandas, matplotlib imported | {p50(cold_pandas):.0f} | "
        f"{p50(cold_pandas) / p50(plain_pandas):.1f}x plain import |",
        f"| **container from the warm pool, pandas imported, answering** | **{p50(warm):.1f}** | target at most 300 |",
        f"| **warm round trip of `1 + 1`** | **{p50(round_trip):.2f}** | target at most 10; "
        f"{p50(plain_print) / p50(round_trip):.0f}x faster than plain python |",
        f"| start, a cell trying to make 30,000 files ({quota_mode}: stops at {config.limits.work_files}), close | "
        f"{p50(flooded):.0f} | |",
    ]
    table = "\n".join(rows)
    print(table)
    body = f"""## Sandbox

Written by `python bench/sandbox.py`, one run: bubblewrap + seccomp + rlimits + cgroups, per-container uid,
persistent IPython worker (see the README's "Code execution" section). The warm pool keeps one container
started with the data stack imported; its row times taking one from the pool until it answers a call.
Round trip = host sends the cell to the sandbox's supervisor (pid 1 inside), which passes it to the IPython
worker, captures its output and checks its reply; the host checks the reply again and walks /mnt/data for
changed files.

{table}
"""
    write_section(args.out, "sandbox", body)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
