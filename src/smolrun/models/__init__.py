"""Model names -> weights on disk: the registry, local GGUF paths and Hugging Face files."""

from smolrun.models.registry import DEFAULT_MODEL, REGISTRY, ModelSpec, ResolvedModel, list_models, resolve

__all__ = ["REGISTRY", "DEFAULT_MODEL", "ModelSpec", "ResolvedModel", "list_models", "resolve"]
