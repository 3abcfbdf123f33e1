"""Output constraints: JSON Schema checks (with OpenAI-style paths) and llguidance grammars."""

from smolrun.constraints.grammar import Grammar, compile_format
from smolrun.constraints.schema import check_schema

__all__ = ["Grammar", "check_schema", "compile_format"]
