"""Which part of a model turn each generated token belongs to: the think block, then the branch the grammar took
(free text or a JSON answer, function calls, a code call), read from the tokens as they are generated, so that
no route has to guess it from text (see constraints/grammar.turn_source for the turn's grammar)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from smolrun.turn import Branch

Piece = Branch | Literal["thought"]
BLANKS = b" \n"  # what the grammar lets come between a think block and the answer (dropped)


@dataclass(frozen=True)
class Tag:
    """How a branch opens: its text, and its token where that text is one special token (whose piece some
    tokenizers render as nothing)."""

    branch: Branch
    text: bytes
    token: int | None = None


@dataclass(frozen=True)
class Parts:
    """A turn's layout: the think block it starts with (open and close tokens), then one of the branches. Free
    text never starts like a tag (the grammar forbids it), so the first bytes that differ from every tag tell
    the branch."""

    think: tuple[int, int] | None = None
    tags: tuple[Tag, ...] = ()


PLAIN = Parts()


@dataclass
class Segment:
    """Consecutive generated tokens of one piece, and their text (tags of the think block and the blanks after
    it left out)."""

    piece: Piece
    tokens: list[int]
    data: bytes


class PartReader:
    """Follows one turn's tokens; `read` sorts each batch into segments. Tokens whose branch is not known yet
    (a prefix of a tag) are held until it is."""

    def __init__(self, parts: Parts, token_bytes: Callable[[int], bytes]) -> None:
        self.parts, self.token_bytes = parts, token_bytes
        self.piece: Piece | None = "thought" if parts.think is not None else self._branchless()
        self.blank = False  # after the think block, until the answer's first byte: blanks are dropped
        self.thought_tokens = 0  # of the think block, its tags included
        self._held: list[int] = []
        self._head = b""  # the answer's text while its branch is not known

    def read(self, tokens: list[int]) -> list[Segment]:
        out: list[Segment] = []
        for token in tokens:
            if self.piece == "thought":
                self.thought_tokens += 1
                assert self.parts.think is not None
                if token == self.parts.think[1]:
                    self.piece, self.blank = self._branchless(), True
                _add(out, "thought", token, b"" if token in self.parts.think else self.token_bytes(token))
                continue
            data = self.token_bytes(token)
            if self.blank:
                data = data.lstrip(BLANKS)
                self.blank = not data
            if self.piece is not None:
                _add(out, self.piece, token, data)
                continue
            self._held.append(token)
            self._head += data
            branch = self._decide(token)
            if branch is not None:
                self.piece = branch
                out.append(Segment(branch, self._held, self._head))
                self._held, self._head = [], b""
        return out

    def flush(self) -> list[Segment]:
        """At the end: tokens still held (the turn ended inside what could have been a tag) as text."""
        if not self._held:
            return []
        segment = Segment("text", self._held, self._head)
        self._held, self._head = [], b""
        return [segment]

    def _branchless(self) -> Piece | None:
        return None if self.parts.tags else "text"

    def _decide(self, token: int) -> Branch | None:
        head = self._head
        for tag in self.parts.tags:
            if token == tag.token or (head.startswith(tag.text) and tag.text):
                return tag.branch
        if not head or any(tag.text.startswith(head) for tag in self.parts.tags):
            return None
        return "text"


def _add(out: list[Segment], piece: Piece, token: int, data: bytes) -> None:
    if out and out[-1].piece == piece:
        out[-1].tokens.append(token)
        out[-1].data += data
    else:
        out.append(Segment(piece, [token], data))
