"""A thinking turn's output: the think block split from the answer as it streams, its tokens counted."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from smolrun.backends.decode import overlap
from smolrun.turn import Done, Event, ReasoningDelta, TextDelta


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


def split_thoughts(events: Iterator[Event], block: ThinkBlock) -> Iterator[Event]:
    """ReasoningDelta for the thoughts, then TextDelta for the answer (leading blank lines dropped); Done
    carries the number of tokens the think block used."""
    raw = ""  # text of the think block so far, tags included
    sent = 0  # characters of thought already sent
    tokens: list[int] = []  # generated while thinking (a delta's tokens never come after its text)
    reasoning_tokens: int | None = None  # known once the block is closed
    answer_started = False
    for event in events:
        if isinstance(event, Done):
            if reasoning_tokens is None:  # cut inside the block: all of it was thinking
                thought = raw[len(block.open) :][sent:] if raw.startswith(block.open) else raw[sent:]
                if thought:
                    yield ReasoningDelta(thought)
                reasoning_tokens = event.stats.completion_tokens
            yield Done(event.finish_reason, replace(event.stats, reasoning_tokens=reasoning_tokens))
            return
        if not isinstance(event, TextDelta):
            yield event
            continue
        if reasoning_tokens is not None:
            text = event.text if answer_started else event.text.lstrip()
            if text:
                answer_started = True
                yield TextDelta(text, event.tokens)
            continue
        raw += event.text
        tokens += event.tokens
        start = len(block.open) if raw.startswith(block.open) else 0
        end = raw.find(block.close, start)
        if end < 0:
            visible = len(raw) - overlap(raw, block.close)
            if visible - start > sent:
                yield ReasoningDelta(raw[start + sent : visible])
                sent = visible - start
            continue
        if end - start > sent:
            yield ReasoningDelta(raw[start + sent : end])
        reasoning_tokens = tokens.index(block.close_token) + 1 if block.close_token in tokens else len(tokens)
        answer = raw[end + len(block.close) :].lstrip()
        if answer:
            answer_started = True
            yield TextDelta(answer, ())
