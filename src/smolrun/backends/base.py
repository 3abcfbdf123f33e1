"""What the decode loop needs from an inference library, and what an engine offers the server."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt
from llguidance import LLTokenizer


def reusable_prefix(cached: Sequence[int], tokens: Sequence[int]) -> int:
    """How many leading `tokens` the KV cache already holds and may keep: the common prefix, less at least
    one token, which is evaluated again to get fresh logits."""
    common, limit = 0, min(len(cached), len(tokens))
    while common < limit and cached[common] == tokens[common]:
        common += 1
    return min(common, len(tokens) - 1)


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

    def tokenize(self, text: str) -> list[int]:
        """Tokenize a rendered prompt, parsing special tokens, adding BOS when the model wants it."""
        ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token adds to the output text (empty for control tokens)."""
        ...

    def prefill(self, tokens: Sequence[int], reuse: bool = True) -> npt.NDArray[np.float32]:
        """Make `tokens` the whole sequence; logits after its last token.

        With `reuse`, a prefix already in the KV cache is kept. Logits then differ from a full prefill
        in the last float bits (other batch shapes), so seeded sampling asks for `reuse=False`."""
        ...

    def extend(self, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        """Append `tokens` in one batch; logits after the last one."""
        ...
