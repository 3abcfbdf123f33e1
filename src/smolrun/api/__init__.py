"""The OpenAI-compatible HTTP API."""

from smolrun.api.app import create_app

__all__ = ["create_app"]
