"""smolrun: a local OpenAI-compatible server for small open models with guaranteed structured outputs."""

__version__ = "0.1.0"

__all__ = ["__version__"]
