"""The README's own examples run as shown on the bundled model: the CLI block and the SDK snippet."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Server

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def block(marker: str) -> str:
    inner = README.split(f"<!-- {marker} -->")[1].split(f"<!-- /{marker} -->")[0].strip()
    return inner.removeprefix("```sh").removesuffix("```").strip()


def json_values(text: str) -> list[object]:
    """Every JSON value printed one after another (pretty or not) at the start of `text`."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while (at := len(text) - len(text[at:].lstrip())) < len(text) and text[at] in "{[":
        value, at = decoder.raw_decode(text, at)
        values.append(value)
    return values


@pytest.mark.model
def test_the_cli_block_runs_as_shown(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make setup`")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", block("readme:cli")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    city, greeting = json_values(out.stdout)
    assert isinstance(city, dict) and set(city) == {"name", "country", "population"}
    assert isinstance(city["population"], int) and abs(city["population"]) <= 2**53 - 1
    assert isinstance(greeting, dict)
    assert "smollm2-135m   bundled" in out.stdout  # `smolrun models`


@pytest.mark.model
def test_the_sdk_snippet_runs_as_shown(server: Server) -> None:
    snippet = README.split("## Using it")[1].split("```python")[1].split("```")[0]
    assert 'base_url="http://127.0.0.1:8000/v1"' in snippet
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet.replace("http://127.0.0.1:8000/v1", server.url), {})  # noqa: S102 - our own README
    # Greedy, but a model's exact words are not the README's contract: the City it printed is.
    assert re.fullmatch(r"name=(['\"]).*\1 country=(['\"]).*\2 population=-?\d+\n", printed.getvalue())
