"""The DRY repetition penalty ("Don't Repeat Yourself"): a token that would extend a sequence already generated
is penalised, more the longer the repeat.

Where the last k tokens also occurred earlier, followed by token t, t would make the repeat k + 1 long: with
k >= allowed_length, t's logit drops by multiplier * base ** (k - allowed_length). A loop is broken after a few
tokens, while words that merely recur are left alone. A small model's JSON loops run across structure as often
as inside a string (`{"description":{"description":...`, `"dataType":"json","dataType":"json",...`), so only a
newline breaks a match. What ends a loop is never penalised: a token that closes an object or array, a lone
closing quote, the end of the text; nor are the keys the schema forces, which the grammar writes without
sampling. It moves probabilities only: the grammar's mask is applied after.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

BREAKERS = frozenset(b"\n")  # a match never runs across a token holding one
_CLOSERS = frozenset(b"}]")
# Defaults, tuned on real-world schemas with the bundled 135M model (BENCHMARKS.md): JSON answers finish.
DRY_MULTIPLIER = 0.8
DRY_BASE = 1.75
DRY_ALLOWED_LENGTH = 2
_MAX_EXPONENT = 30  # base ** 30 is far beyond any logit gap already; more would only overflow


class Dry:
    """The penalty over one sequence's generated tokens (forced ones included: they are text the model reads)."""

    def __init__(self, multiplier: float, base: float, allowed_length: int,
                 token_bytes: Callable[[int], bytes]) -> None:
        self.multiplier, self.base, self.allowed_length = multiplier, base, max(1, allowed_length)
        self.token_bytes = token_bytes
        self._breaks: dict[int, bool] = {}
        self._spared: dict[int, bool] = {}
        self._tokens = np.zeros(256, dtype=np.int64)
        # _match[i] (0 < i < n): how many tokens before position i equal the last ones generated, i.e. the
        # length of the common suffix of tokens[:i] and tokens[:n]; tokens[i] is what followed that earlier.
        self._match = np.zeros(257, dtype=np.int32)
        self._n = 0

    @property
    def on(self) -> bool:
        return self.multiplier > 0

    def breaks(self, token: int) -> bool:
        known = self._breaks.get(token)
        if known is None:
            data = self.token_bytes(token)
            known = self._breaks[token] = not data or any(b in BREAKERS for b in data)
        return known

    def spared(self, token: int) -> bool:
        """Whether `token` is never penalised: it ends a string, a container or the text."""
        known = self._spared.get(token)
        if known is None:
            data = self.token_bytes(token)
            known = self._spared[token] = self.breaks(token) or data == b'"' or any(b in _CLOSERS for b in data)
        return known

    def add(self, tokens: list[int]) -> None:
        if not self.on:
            return
        for token in tokens:
            self._push(token)

    def _push(self, token: int) -> None:
        n = self._n
        if n + 1 >= len(self._tokens):
            self._tokens = np.concatenate([self._tokens, np.zeros_like(self._tokens)])
            self._match = np.concatenate([self._match, np.zeros_like(self._match)])
        if self.breaks(token):
            self._match[: n + 1] = 0
        else:
            # An earlier match grows by one where the token after it is this one; every other match ends.
            grown = np.where(self._tokens[:n] == token, self._match[:n] + 1, 0)
            self._match[1 : n + 1] = grown
            self._match[0] = 0
        self._tokens[n] = token
        self._n = n + 1

    def apply(self, logits: npt.NDArray[np.float32]) -> None:
        """Lower, in place, the logits of tokens that would extend a repeat."""
        n = self._n
        if not self.on or n < 2:
            return
        at = np.nonzero(self._match[1:n] >= self.allowed_length)[0] + 1
        if not at.size:
            return
        longest: dict[int, int] = {}
        for token, length in zip(self._tokens[at].tolist(), self._match[at].tolist(), strict=True):
            if length > longest.get(token, 0) and not self.spared(token) and token < logits.shape[0]:
                longest[token] = length
        for token, length in longest.items():
            exponent = min(length - self.allowed_length, _MAX_EXPONENT)
            logits[token] -= np.float32(self.multiplier * self.base**exponent)
