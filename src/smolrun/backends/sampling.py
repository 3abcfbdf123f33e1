"""Pick the next token from raw logits and an optional grammar bitmask.

This runs once per token on the loop's thread, right after a forward pass has flushed the CPU's caches, where
every numpy call pays for cold code and data: the plain draw and greedy picks are one C call each
(`_draw.c`: the draw exponentiates only the tokens near the top, and is exact); a grammar mask is applied only
when the token drawn without it is banned (exact, see sample); the nucleus path works in numpy, in a
preallocated float32 buffer."""

from __future__ import annotations

import os
import threading

import numpy as np
import numpy.typing as npt

from smolrun.backends import _draw
from smolrun.turn import SamplingParams

Logits = npt.NDArray[np.float32]
Bitmask = npt.NDArray[np.int32]  # shape (1, ceil(V/32)); token t allowed iff bit t%32 of word t//32 is set


class Rng:
    """One sequence's random stream: 8 bytes of splitmix64 state that each draw advances (in C), so a seed
    repeats every draw exactly."""

    __slots__ = ("state",)

    def __init__(self, seed: int | None = None) -> None:
        value = int.from_bytes(os.urandom(8), "little") if seed is None else seed % 2**64
        self.state = bytearray(value.to_bytes(8, "little"))

    def random(self) -> float:
        """A float in [0, 1)."""
        return _draw.uniform(self.state)


class _Buffers:
    """Scratch space for one vocabulary size, reused every step."""

    def __init__(self, size: int) -> None:
        self.weights = np.empty(size, dtype=np.float32)
        self.masked = np.empty(size, dtype=np.float32)


_local = threading.local()


def _buffers(size: int) -> _Buffers:
    by_size: dict[int, _Buffers] = _local.__dict__.setdefault("by_size", {})
    if size not in by_size:
        by_size[size] = _Buffers(size)
    return by_size[size]


def allowed(bitmask: Bitmask, token: int) -> bool:
    if token >> 5 >= bitmask.shape[1]:
        return False  # beyond the grammar tokenizer's vocabulary (padding rows of the output layer)
    return bool((int(bitmask[0, token >> 5]) >> (token & 31)) & 1)


def _keep(bitmask: Bitmask, size: int) -> npt.NDArray[np.bool_]:
    bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little").view(np.bool_)
    if bits.shape[0] >= size:
        return bits[:size]
    return np.concatenate([bits, np.zeros(size - bits.shape[0], dtype=np.bool_)])


def mask_logits(logits: Logits, bitmask: Bitmask, out: Logits | None = None) -> Logits:
    """`logits` with every banned token at -inf, written to `out` (a new array without one)."""
    out = np.empty_like(logits) if out is None else out
    out.fill(-np.inf)
    np.copyto(out, logits, where=_keep(bitmask, logits.shape[0]))
    return out


def sample(logits: Logits, bitmask: Bitmask | None, params: SamplingParams, rng: Rng) -> int:
    if params.temperature <= 0:
        return greedy(logits, bitmask)
    if params.top_k > 0 or params.top_p < 1.0:  # the nucleus depends on the mask: mask first
        buffers = _buffers(logits.shape[0])
        if bitmask is not None:
            logits = mask_logits(logits, bitmask, buffers.masked)
        return _nucleus(_weights(logits, params.temperature, buffers.weights), params, rng)
    if bitmask is not None:
        # Draw without the mask and keep the token when the grammar allows it; otherwise draw from the masked
        # distribution. With A the allowed mass, P(t) = p(t) + (1 - A) * p(t) / A = p(t) / A for an allowed t:
        # exactly the masked softmax, and most steps skip the mask.
        token = _draw.draw(logits, params.temperature, rng.state)
        if allowed(bitmask, token):
            return token
        logits = mask_logits(logits, bitmask, _buffers(logits.shape[0]).masked)
    return _draw.draw(logits, params.temperature, rng.state)  # ValueError when no token is allowed


def greedy(logits: Logits, bitmask: Bitmask | None) -> int:
    best = _draw.argmax(logits)
    # Most steps the model's favourite is allowed: test its bit instead of masking the whole vocabulary.
    if bitmask is None or allowed(bitmask, best):
        return best
    return _draw.argmax(mask_logits(logits, bitmask, _buffers(logits.shape[0]).masked))


def _weights(logits: Logits, temperature: float, out: Logits) -> Logits:
    """exp((logits - max) / temperature) in `out` (banned tokens, at -inf, get 0)."""
    top = float(np.max(logits))
    if not np.isfinite(top):
        raise ValueError("no token is allowed")
    np.subtract(logits, np.float32(top), out=out)
    np.multiply(out, np.float32(1.0 / temperature), out=out)
    return np.exp(out, out=out)


def _nucleus(weights: npt.NDArray[np.float32], params: SamplingParams, rng: Rng) -> int:
    # Sorting 49k-262k weights every step is slow: grow the candidate set until it holds the nucleus.
    vocab = weights.shape[0]
    total = float(weights.sum(dtype=np.float64))
    sizes = [params.top_k] if params.top_k > 0 else [64, 1024, vocab]
    for size in sizes:
        size = min(size, vocab)
        candidates = np.argpartition(-weights, size - 1)[:size] if size < vocab else np.arange(vocab)
        candidates = candidates[np.argsort(-weights[candidates], kind="stable")]
        probs = weights[candidates].astype(np.float64)
        mass = float(probs.sum()) if params.top_k > 0 else total
        cumulative = np.cumsum(probs) / mass
        if cumulative[-1] >= params.top_p or size == vocab or params.top_k > 0:
            cut = min(int(np.searchsorted(cumulative, params.top_p)) + 1, size)
            kept = np.cumsum(probs[:cut])
            index = min(int(np.searchsorted(kept, rng.random() * kept[-1], side="right")), cut - 1)
            while probs[index] <= 0:  # rounding put the point past the last token with weight
                index -= 1
            return int(candidates[index])
    raise AssertionError("unreachable: the last candidate set is the whole vocabulary")
