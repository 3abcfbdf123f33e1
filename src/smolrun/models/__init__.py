"""Model names -> weights on disk: the registry, local GGUF paths and Hugging Face files."""

from smolrun.models.registry import (
    DEFAULT_MODEL,
    DEFAULT_TRANSFORMERS_MODEL,
    DEFAULT_VISION_MODEL,
    REGISTRY,
    ModelSpec,
    ResolvedModel,
    hub_offline,
    list_models,
    resolve,
)

__all__ = ["REGISTRY", "DEFAULT_MODEL", "DEFAULT_TRANSFORMERS_MODEL", "DEFAULT_VISION_MODEL", "ModelSpec",
           "ResolvedModel", "hub_offline", "list_models", "resolve"]
