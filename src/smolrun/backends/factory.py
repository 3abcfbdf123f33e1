"""What the engine takes from the backends: the model a name stands for, and the runner that decodes on it.

Every runner takes a prepared turn the same way (`Runner`); which one runs is the model's kind: vLLM servers,
a model that batches (llama.cpp's sequences), or one sequence at a time (transformers).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

from smolrun.backends.base import BatchModel, Model
from smolrun.backends.decode import Prepared
from smolrun.backends.vllm import VllmModel
from smolrun.config import Settings
from smolrun.errors import InvalidRequest
from smolrun.models import REGISTRY, hub_offline, resolve
from smolrun.scheduler import Sink

AnyModel = Model | BatchModel | VllmModel


class Runner(Protocol):
    """Decodes prepared turns on one model, on threads of its own: admission (QueueFull, a 429, when
    `bounded` and too many wait; ServerShuttingDown, a 503, after close), events to each turn's sink, and
    cancellation when `cancelled` says so."""

    def submit(self, prepared: Prepared, sink: Sink, cancelled: Callable[[], bool], bounded: bool = True) -> None:
        ...

    def waiting(self) -> int:
        """Turns admitted, not yet decoding."""
        ...

    def running(self) -> int:
        """Turns decoding now."""
        ...

    def kv_used(self) -> int | None:
        """KV cells in use where the turns share one cache (None elsewhere)."""
        ...

    def close(self) -> None:
        """End every live and queued turn with ServerShuttingDown; return once its threads have exited."""
        ...


def batches(model: AnyModel) -> bool:
    """Whether turns decode together on this model (continuous batching) rather than one at a time."""
    return hasattr(model, "n_seq")


def start_runner(model: AnyModel, max_queue: int, max_inflight: int) -> Runner:
    """The runner for `model`, its thread started."""
    if isinstance(model, VllmModel):
        from smolrun.backends.vllm import VllmRunner

        return VllmRunner(model, max_queue, max_inflight)
    if batches(model):
        from smolrun.backends.batch import BatchEngine

        return BatchEngine(cast(BatchModel, model), max_queue)
    from smolrun.scheduler import Scheduler

    return Scheduler(max_queue, cast(Model, model))


def load_model(settings: Settings, model: str | None = None, mmproj: str | None = None) -> AnyModel:
    """The model `model` stands for (default: settings.model), with the vision projector `mmproj` on
    llama.cpp (see models.resolve). Hugging Face directories load on transformers whatever the backend setting."""
    name = model or settings.model
    if settings.backend == "vllm":
        if mmproj is not None:
            raise InvalidRequest("--mmproj is for GGUF models on llama.cpp; the vLLM engine takes no pictures",
                                 param="mmproj")
        from smolrun.backends.vllm_server import connect

        return connect(settings, name)
    if settings.backend == "transformers" or (name not in REGISTRY and Path(name).expanduser().is_dir()):
        if mmproj is not None:
            raise InvalidRequest("--mmproj is for GGUF models on llama.cpp; on transformers a vision model "
                                 "carries its own image side", param="mmproj")
        from smolrun.backends.transformers import TransformersModel, hf_source

        source = hf_source(name, offline=settings.offline)
        return TransformersModel(source, n_ctx=settings.n_ctx, device=settings.device, threads=settings.threads,
                                 offline=hub_offline(settings.offline))
    from smolrun.backends.llama_cpp import LlamaCppModel

    resolved = resolve(name, offline=settings.offline, mmproj=mmproj)
    return LlamaCppModel(resolved.path, name=resolved.name, n_ctx=settings.n_ctx, n_threads=settings.threads,
                         mmproj=resolved.mmproj, n_seq=settings.parallel, gpu_layers=settings.gpu_layers)
