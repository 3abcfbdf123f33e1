"""Inference engines behind one decode loop; each imports its library lazily."""

from smolrun.backends.base import Model

__all__ = ["Model"]
