"""Settings for a smolrun process: one object, built from the CLI or the environment, passed explicitly."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from smolrun.models import DEFAULT_MODEL, DEFAULT_TRANSFORMERS_MODEL

Backend = Literal["llama", "transformers", "vllm"]


def default_data_dir() -> Path:
    if "SMOLRUN_DATA_DIR" in os.environ:
        return Path(os.environ["SMOLRUN_DATA_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/smolrun")
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "smolrun"


def comma_list(*values: str) -> tuple[str, ...]:
    """Items of comma-separated values, stripped, without empty ones."""
    return tuple(item.strip() for value in values for item in value.split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL
    backend: Backend = "llama"  # llama.cpp for GGUF files; transformers for Hugging Face models; vllm for GPUs
    device: str | None = None  # transformers only: None picks CUDA when present, else the CPU
    vision_model: str | None = None  # a second model that sees, for requests with images
    models: tuple[str, ...] = ()  # more models loaded when a request names one ("all": every one on this machine)
    max_loaded_models: int = 3  # models in memory at once; past it the least recently used idle one is unloaded
    max_loaded_gb: float | None = None  # the same for the loaded models' memory (weights and KV cache)
    mmproj: str | None = None  # llama.cpp: the vision projector GGUF of the model that sees (default: its own)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()  # Host names answered besides loopback ones; "*": any (see api/browser.py)
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed besides the server's own, with CORS; "*": any
    n_ctx: int = 8192
    threads: int | None = None  # None: every CPU this process may use
    max_queue: int = 16  # requests waiting for the model before new ones get 429
    stream_interval_ms: int = 20  # streamed deltas within this many ms of the last chunk are sent with the next
    parallel: int = 4  # llama.cpp: sequences decoded together (continuous batching); their KV cache is shared
    gpu_layers: int | None = None  # llama.cpp: layers offloaded to a GPU; None: all where the build can, else 0
    vllm_urls: tuple[str, ...] = ()  # vllm: running servers of the model (replicas); none: launch one here
    vllm_args: tuple[str, ...] = ()  # vllm: more arguments for the `vllm serve` that smolrun launches
    vllm_python: str | None = None  # vllm: the Python whose vLLM smolrun launches (default: where `make vllm` puts it)
    max_calls_per_turn: int = 8  # function calls one model turn may make (parallel_tool_calls)
    dry_multiplier: float = 0.8  # DRY repetition penalty inside JSON answers (0: off; requests may set it)
    max_inflight: int = 64  # vllm: requests in flight on its servers; --max-queue more wait before 429
    offline: bool | None = None  # None: follow HF_HUB_OFFLINE
    data_dir: Path = field(default_factory=lambda: default_data_dir())  # files and the metadata database
    max_file_mb: int = 512  # largest upload to /v1/files or a container
    max_body_mb: int = 64  # largest JSON request body (pictures as data URLs included)
    warm_containers: int = 1  # sandboxes kept started with pandas imported, for new containers

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Defaults, then SMOLRUN_* environment variables, then explicit (non-None) overrides."""
        env = os.environ
        values: dict[str, object] = {}
        if "SMOLRUN_MODEL" in env:
            values["model"] = env["SMOLRUN_MODEL"]
        if env.get("SMOLRUN_API_KEY"):
            values["api_key"] = env["SMOLRUN_API_KEY"]
        if "SMOLRUN_N_CTX" in env:
            values["n_ctx"] = int(env["SMOLRUN_N_CTX"])
        if "SMOLRUN_THREADS" in env:
            values["threads"] = int(env["SMOLRUN_THREADS"])
        if "SMOLRUN_STREAM_INTERVAL_MS" in env:
            values["stream_interval_ms"] = int(env["SMOLRUN_STREAM_INTERVAL_MS"])
        if "SMOLRUN_MAX_QUEUE" in env:
            values["max_queue"] = int(env["SMOLRUN_MAX_QUEUE"])
        if "SMOLRUN_PARALLEL" in env:
            values["parallel"] = int(env["SMOLRUN_PARALLEL"])
        if "SMOLRUN_GPU_LAYERS" in env:
            values["gpu_layers"] = int(env["SMOLRUN_GPU_LAYERS"])
        if "SMOLRUN_BACKEND" in env:
            values["backend"] = env["SMOLRUN_BACKEND"]
        if env.get("SMOLRUN_VISION_MODEL"):
            values["vision_model"] = env["SMOLRUN_VISION_MODEL"]
        if env.get("SMOLRUN_MODELS"):
            values["models"] = comma_list(env["SMOLRUN_MODELS"])
        if "SMOLRUN_MAX_LOADED_MODELS" in env:
            values["max_loaded_models"] = int(env["SMOLRUN_MAX_LOADED_MODELS"])
        if env.get("SMOLRUN_VLLM_URLS"):
            values["vllm_urls"] = comma_list(env["SMOLRUN_VLLM_URLS"])
        if env.get("SMOLRUN_VLLM_PYTHON"):
            values["vllm_python"] = env["SMOLRUN_VLLM_PYTHON"]
        for name in ("allowed_hosts", "allowed_origins"):
            if env.get(f"SMOLRUN_{name.upper()}"):
                values[name] = comma_list(env[f"SMOLRUN_{name.upper()}"])
        if env.get("SMOLRUN_MMPROJ"):
            values["mmproj"] = env["SMOLRUN_MMPROJ"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "model" not in values and values.get("backend") == "transformers":
            values["model"] = DEFAULT_TRANSFORMERS_MODEL
        return cls(**values)  # type: ignore[arg-type]
