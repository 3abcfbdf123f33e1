"""Pick the next token from raw logits and an optional grammar bitmask, in numpy.

This runs once per token on the loop's thread, so it is written for speed: float32 in preallocated buffers
(one set per vocabulary size and thread), a two-level cumulative sum instead of one over the whole
vocabulary, and a grammar mask applied only when the token drawn without it is banned (exact, see sample).
"""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt

from smolrun.turn import SamplingParams

Logits = npt.NDArray[np.float32]
Bitmask = npt.NDArray[np.int32]  # shape (1, ceil(V/32)); token t allowed iff bit t%32 of word t//32 is set

BLOCK = 256  # tokens per block of the two-level draw: a cumsum over V/256 block sums, then over one block


class _Buffers:
    """Scratch space for one vocabulary size, reused every step."""

    def __init__(self, size: int) -> None:
        self.weights = np.zeros(-(-size // BLOCK) * BLOCK, dtype=np.float32)  # the padding stays at weight 0
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


def sample(logits: Logits, bitmask: Bitmask | None, params: SamplingParams, rng: np.random.Generator) -> int:
    if params.temperature <= 0:
        return greedy(logits, bitmask)
    size = logits.shape[0]
    buffers = _buffers(size)
    if params.top_k > 0 or params.top_p < 1.0:  # the nucleus depends on the mask: mask first
        if bitmask is not None:
            logits = mask_logits(logits, bitmask, buffers.masked)
        return _nucleus(_weights(logits, params.temperature, buffers)[:size], params, rng)
    if bitmask is not None:
        # Draw without the mask and keep the token when the grammar allows it; otherwise draw from the masked
        # distribution. With A the allowed mass, P(t) = p(t) + (1 - A) * p(t) / A = p(t) / A for an allowed t:
        # exactly the masked softmax, and most steps skip the mask.
        token = _draw(_weights(logits, params.temperature, buffers), rng)
        if allowed(bitmask, token):
            return token
        logits = mask_logits(logits, bitmask, buffers.masked)
    return _draw(_weights(logits, params.temperature, buffers), rng)


def greedy(logits: Logits, bitmask: Bitmask | None) -> int:
    best = int(np.argmax(logits))
    # Most steps the model's favourite is allowed: test its bit instead of masking the whole vocabulary.
    if bitmask is None or allowed(bitmask, best):
        return best
    return int(np.argmax(mask_logits(logits, bitmask, _buffers(logits.shape[0]).masked)))


def _weights(logits: Logits, temperature: float, buffers: _Buffers) -> npt.NDArray[np.float32]:
    """exp((logits - max) / temperature) in the padded weight buffer (banned tokens, at -inf, get 0)."""
    top = float(np.max(logits))
    if not np.isfinite(top):
        raise ValueError("no token is allowed")
    weights = buffers.weights[: logits.shape[0]]
    np.subtract(logits, np.float32(top), out=weights)
    np.multiply(weights, np.float32(1.0 / temperature), out=weights)
    np.exp(weights, out=weights)
    return buffers.weights


def _draw(weights: npt.NDArray[np.float32], rng: np.random.Generator) -> int:
    """A token drawn in proportion to `weights` (padded to whole blocks): the block first, then within it."""
    blocks = weights.reshape(-1, BLOCK).sum(axis=1, dtype=np.float64)
    cumulative = np.cumsum(blocks)
    point = rng.random() * cumulative[-1]
    block = min(int(np.searchsorted(cumulative, point, side="right")), blocks.shape[0] - 1)
    while blocks[block] <= 0:  # rounding put the point past the last block with weight
        block -= 1
    start = block * BLOCK
    inner = np.cumsum(weights[start:start + BLOCK], dtype=np.float64)
    rest = point - (cumulative[block - 1] if block else 0.0)
    index = min(int(np.searchsorted(inner, rest, side="right")), BLOCK - 1)
    while weights[start + index] <= 0:  # the same, within the block
        index -= 1
    return int(start + index)


def _nucleus(weights: npt.NDArray[np.float32], params: SamplingParams, rng: np.random.Generator) -> int:
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
            probs = probs[:cut] / probs[:cut].sum()
            return int(candidates[rng.choice(cut, p=probs)])
    raise AssertionError("unreachable: the last candidate set is the whole vocabulary")
