"""A thinking turn's think block: its tags and its budget (the decoder splits it from the answer, backends/parts.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ThinkBlock:
    """The think block a turn starts with; the grammar closes it after `thought_tokens` tokens of thought.

    The tags must be single special tokens (`open_token`, `close_token`): the thought is one free-text lexeme,
    which only a token outside its text can end, and which the grammar can then force at the budget."""

    open: str
    close: str
    open_token: int
    close_token: int
    budget: int  # tokens of the whole block, tags included

    @property
    def thought_tokens(self) -> int:
        """The budget less the two tag tokens (at least one token of thought)."""
        return max(1, self.budget - 2)
