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
    splitter = ThoughtSplitter(block)
    for event in events:
        yield from splitter.feed(event)


class ThoughtSplitter:
    """split_thoughts one event at a time, for streams that push events rather than being iterated."""

    def __init__(self, block: ThinkBlock) -> None:
        self.block = block
        self.raw = ""  # text of the think block so far, tags included
        self.sent = 0  # characters of thought already sent
        self.tokens: list[int] = []  # generated while thinking (a delta's tokens never come after its text)
        self.reasoning_tokens: int | None = None  # known once the block is closed
        self.answer_started = False

    def feed(self, event: Event) -> list[Event]:
        block = self.block
        if isinstance(event, Done):
            out: list[Event] = []
            if self.reasoning_tokens is None:  # cut inside the block: all of it was thinking
                raw = self.raw
                thought = raw[len(block.open) :][self.sent:] if raw.startswith(block.open) else raw[self.sent:]
                if thought:
                    out.append(ReasoningDelta(thought))
                self.reasoning_tokens = event.stats.completion_tokens
            out.append(Done(event.finish_reason, replace(event.stats, reasoning_tokens=self.reasoning_tokens)))
            return out
        if not isinstance(event, TextDelta):
            return [event]
        if self.reasoning_tokens is not None:
            text = event.text if self.answer_started else event.text.lstrip()
            if not text:
                return []
            self.answer_started = True
            return [TextDelta(text, event.tokens)]
        self.raw += event.text
        self.tokens += event.tokens
        raw = self.raw
        start = len(block.open) if raw.startswith(block.open) else 0
        end = raw.find(block.close, start)
        if end < 0:
            visible = len(raw) - overlap(raw, block.close)
            if visible - start > self.sent:
                thought = raw[start + self.sent : visible]
                self.sent = visible - start
                return [ReasoningDelta(thought)]
            return []
        out = [ReasoningDelta(raw[start + self.sent : end])] if end - start > self.sent else []
        self.reasoning_tokens = (self.tokens.index(block.close_token) + 1 if block.close_token in self.tokens
                                 else len(self.tokens))
        answer = raw[end + len(block.close) :].lstrip()
        if answer:
            self.answer_started = True
            out.append(TextDelta(answer, ()))
        return out
