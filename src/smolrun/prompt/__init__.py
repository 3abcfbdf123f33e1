"""Prompt rendering: a model's own chat template, in a sandboxed Jinja environment."""

from smolrun.prompt.template import CHATML, render

__all__ = ["CHATML", "render"]
