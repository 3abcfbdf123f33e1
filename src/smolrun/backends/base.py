"""What the decode loops need from an inference library: one sequence (Model) or a batch of many (BatchModel)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from llguidance import LLTokenizer

from smolrun.turn import Image, Video


def reusable_prefix(cached: Sequence[int], tokens: Sequence[int]) -> int:
    """How many leading `tokens` the KV cache already holds and may keep: the common prefix, less at least
    one token, which is evaluated again to get fresh logits."""
    common, limit = 0, min(len(cached), len(tokens))
    while common < limit and cached[common] == tokens[common]:
        common += 1
    return min(common, len(tokens) - 1)


@dataclass(frozen=True)
class Pixels:
    """One picture's (or video's) preprocessed tiles and the span of its image tokens in the prompt."""

    start: int
    end: int
    values: Any  # the engine's array of tiles, (tiles, channels, height, width)
    digest: bytes  # identifies the picture and how it was cut (media.digest), for prefix reuse


def reusable_with_pixels(common: int, held: Sequence[Pixels], pixels: Sequence[Pixels]) -> int:
    """Shorten a reusable prefix so that it never splits a picture, and keeps only pictures the cache holds:
    image tokens are one id for every picture, so equal tokens do not mean equal pictures."""
    cached = {(p.start, p.end, p.digest) for p in held}
    for p in sorted(pixels, key=lambda p: p.start):
        if p.start < common and (p.end > common or (p.start, p.end, p.digest) not in cached):
            common = p.start
    return common


class Vision(Protocol):
    """A model's image side: pictures into prompt tokens and pixel tiles."""

    def prompt(self, text: str, media: Sequence[Image | Video]) -> tuple[list[int], tuple[Pixels, ...]]:
        """Tokenize a rendered prompt whose image markers stand for `media`, in order."""
        ...


class Model(Protocol):
    """A loaded model with one sequence of state (KV cache) that the decode loop drives."""

    name: str
    n_ctx: int
    n_vocab: int
    eog_tokens: frozenset[int]  # end-of-generation tokens (EOS, EOT, ...)
    lltokenizer: LLTokenizer
    chat_template: str | None
    bos_token: str
    eos_token: str
    vision: Vision | None  # None: the model cannot see
    reused: int  # prompt tokens the last prefill kept from the KV cache

    def tokenize(self, text: str) -> list[int]:
        """Tokenize a rendered prompt, parsing special tokens, adding BOS when the model wants it."""
        ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token adds to the output text (empty for control tokens)."""
        ...

    def prefill(self, tokens: Sequence[int], reuse: bool = True,
                pixels: Sequence[Pixels] = ()) -> npt.NDArray[np.float32]:
        """Make `tokens` the whole sequence, with `pixels` at their image tokens; logits after its last token.

        With `reuse`, a prefix already in the KV cache is kept. Logits then differ from a full prefill
        in the last float bits (other batch shapes), so seeded sampling asks for `reuse=False`."""
        ...

    def extend(self, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        """Append `tokens` in one batch; logits after the last one."""
        ...


@dataclass(frozen=True)
class Feed:
    """Tokens of one sequence for a forward pass, from position `pos` on; `logits`: return those after the last."""

    seq: int
    pos: int
    tokens: Sequence[int]
    logits: bool
    every: bool = False  # the logits after each of its tokens instead, one row each (scoring a prompt)


class KVFull(Exception):
    """The KV cache has no room for a forward pass; nothing of that pass stays in it."""


class BatchModel(Protocol):
    """A loaded model whose context holds `n_seq` sequences (a shared KV cache of `n_ctx` tokens), evaluated
    together: one forward pass carries tokens of any of them (backends/batch.py drives it)."""

    name: str
    n_ctx: int
    n_seq: int
    n_batch: int  # tokens one pass may carry
    n_vocab: int
    eog_tokens: frozenset[int]
    lltokenizer: LLTokenizer
    chat_template: str | None
    bos_token: str
    eos_token: str
    vision: Vision | None

    def tokenize(self, text: str) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes: ...

    def decode(self, feeds: Sequence[Feed]) -> list[npt.NDArray[np.float32]]:
        """One forward pass; the logits after each feed that asks for them, in order (a (tokens, vocab) array for
        a feed that asks for `every` row). KVFull when it cannot fit."""
        ...

    def forget(self, seq: int, start: int) -> bool:
        """Drop sequence `seq` from position `start` on; False where the cache cannot drop a suffix."""
        ...

    def share(self, src: int, dst: int, start: int, end: int) -> bool:
        """Make sequence `dst`, which holds positions up to `start`, also hold `src`'s positions `start` to `end`
        (the same cells, not a copy); False where the cache cannot (sliding windows)."""
        ...

    def evaluate_tile(self, seq: int, tile: Any, at: int) -> None:
        """Encode one picture tile into sequence `seq` at position `at` (vision models only)."""
        ...
