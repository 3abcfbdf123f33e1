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
    refused.write_text(json.dumps({"type": "object", "properties": {"a": {"not": {}}}}))
    result = CliRunner().invoke(main, ["ask", "hi", "--schema", str(refused)])
    assert result.exit_code == 2 and "'not' is not permitted" in result.output


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
