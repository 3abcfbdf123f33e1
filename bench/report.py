"""BENCHMARKS.md holds one section per benchmark script; each run replaces only its own section."""

from __future__ import annotations

import re
from pathlib import Path

HEADER = """# Benchmarks

Each section is written by the script it names, in one run on one machine; timings depend on the machine
and its load, so compare the ratios inside a section rather than numbers across sections or machines.
"""


def write_section(path: Path, name: str, body: str) -> None:
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
