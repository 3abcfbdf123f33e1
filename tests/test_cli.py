import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from smolrun.cli import main


def test_bad_schema_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    result = CliRunner().invoke(main, ["ask", "hi", "--schema", str(bad)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "not valid JSON" in result.output
    refused = tmp_path / "refused.json"
    not_email = {"type": "string", "not": {"format": "email"}}  # no schema states "not an email"
    refused.write_text(json.dumps({"type": "object", "properties": {"a": not_email}}))
    result = CliRunner().invoke(main, ["ask", "hi", "--schema", str(refused)])
    assert result.exit_code == 2 and "'not' cannot be enforced" in result.output


def test_unknown_model_is_one_line_and_exit_2() -> None:
    result = CliRunner().invoke(main, ["ask", "hi", "--model", "no-such-model"])
    assert result.exit_code == 2 and result.output.startswith("smolrun: error: unknown model")


def test_models_lists_the_registry() -> None:
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0
    assert "smollm2-135m" in result.output and "smollm3-3b" in result.output


@pytest.mark.model
def test_ask_with_schema_prints_pretty_valid_json(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make setup`")
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    path = tmp_path / "city.json"
    path.write_text(json.dumps(schema))
    out = subprocess.run([sys.executable, "-m", "smolrun", "ask", "Describe Paris.", "--schema", str(path),
                          "--frequency-penalty", "0.5", "--max-tokens", "200"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("{\n  ")
    assert set(json.loads(out.stdout)) == {"city", "population"}


@pytest.mark.model
def test_ask_closes_a_schema_answer_at_the_budget_and_says_so(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make setup`")
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    path = tmp_path / "city.json"
    path.write_text(json.dumps(schema))
    out = subprocess.run([sys.executable, "-m", "smolrun", "ask", "Describe Paris at length.", "--schema", str(path),
                          "--max-tokens", "12"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("{\n  ") and set(json.loads(out.stdout)) == {"city", "population"}
    assert out.stderr.strip().splitlines()[-1] == (
        "smolrun: the answer reached the token limit (--max-tokens) and was closed there: the document is valid, "
        "its last values are cut short")


@pytest.mark.model
def test_ask_with_a_file_runs_the_code_loop_and_ends_cleanly(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make setup`")
    from smolrun.sandbox import default_config, unavailable_reason

    if unavailable_reason(default_config()) is not None:
        pytest.skip(f"no sandbox here: {unavailable_reason(default_config())} (`make test` installs it)")
    data = tmp_path / "data.csv"
    data.write_text("x,y\n1,2\n3,4\n")
    out = subprocess.run([sys.executable, "-m", "smolrun", "ask", "Compute the sum of x with Python.", "--file",
                          str(data), "--max-tokens", "400", "--frequency-penalty", "0.3"],
                         capture_output=True, text=True, timeout=300)
    cut = "smolrun: the answer was cut at the token limit (--max-tokens)" in out.stderr
    assert out.returncode == (1 if cut else 0), out.stderr  # 1 only when the token budget cut the answer
    assert "── answer ──" in out.stderr and "Traceback (most recent call last)" not in out.stderr


def test_ask_progress_shows_tokens_and_rate_then_clears(capsys: pytest.CaptureFixture[str]) -> None:
    from smolrun.cli import _Progress

    now = [100.0]
    progress = _Progress()
    progress._clock = lambda: now[0]
    progress.started = progress.shown = 100.0
    progress.add(3)  # under a quarter of a second: nothing drawn yet
    now[0] = 102.0
    progress.add(97)
    progress.clear()
    line = "\rsmolrun: 100 tokens, 50 tokens/s"
    assert capsys.readouterr().err == line + " " * (60 - len(line)) + "\r" + " " * 60 + "\r"


def test_ask_stops_at_512_tokens_by_default() -> None:
    option = next(p for p in main.commands["ask"].params if p.name == "max_tokens")
    assert option.default == 512


class _Loaded(Exception):
    """Raised by the patched Engine.load, with the settings `ask` would have loaded the model with."""


@pytest.mark.parametrize(("args", "env", "threads"), [
    ([], {}, 7),  # the CPUs found idle (patched to 7)
    (["--threads", "3"], {}, 3),
    ([], {"SMOLRUN_THREADS": "5"}, 5),
])
def test_ask_takes_the_idle_cpus_unless_told(monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str],
                                             threads: int) -> None:
    from smolrun.backends import llama_cpp
    from smolrun.engine import Engine

    def load(settings, *rest):  # type: ignore[no-untyped-def]
        raise _Loaded(settings.threads)

    monkeypatch.setattr(llama_cpp, "idle_threads", lambda: 7)
    monkeypatch.setattr(Engine, "load", load)
    monkeypatch.delenv("SMOLRUN_THREADS", raising=False)
    result = CliRunner().invoke(main, ["ask", "hi", *args], env=env)
    assert isinstance(result.exception, _Loaded) and result.exception.args == (threads,)
