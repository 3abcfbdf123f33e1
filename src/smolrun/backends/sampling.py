"""Pick the next token from raw logits and an optional grammar bitmask, in numpy."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from smolrun.turn import SamplingParams

Logits = npt.NDArray[np.float32]
Bitmask = npt.NDArray[np.int32]  # shape (1, ceil(V/32)); token t allowed iff bit t%32 of word t//32 is set


def allowed(bitmask: Bitmask, token: int) -> bool:
    if token >> 5 >= bitmask.shape[1]:
        return False  # beyond the grammar tokenizer's vocabulary (padding rows of the output layer)
    return bool((int(bitmask[0, token >> 5]) >> (token & 31)) & 1)


def mask_logits(logits: Logits, bitmask: Bitmask) -> Logits:
    """A copy of `logits` with every banned token at -inf."""
    bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")
    n = logits.shape[0]
    keep = np.zeros(n, dtype=bool)
    keep[: min(n, bits.shape[0])] = bits[:n].astype(bool)
    return np.where(keep, logits, np.float32(-np.inf)).astype(np.float32, copy=False)


def sample(logits: Logits, bitmask: Bitmask | None, params: SamplingParams, rng: np.random.Generator) -> int:
    if params.temperature <= 0:
        return greedy(logits, bitmask)
    if bitmask is not None:
        logits = mask_logits(logits, bitmask)
    return _sample(logits, params, rng)


def greedy(logits: Logits, bitmask: Bitmask | None) -> int:
    best = int(np.argmax(logits))
    # Most steps the model's favourite is allowed: test its bit instead of masking the whole vocabulary.
    if bitmask is None or allowed(bitmask, best):
        return best
    return int(np.argmax(mask_logits(logits, bitmask)))


def _sample(logits: Logits, params: SamplingParams, rng: np.random.Generator) -> int:
    scaled = logits.astype(np.float64) / params.temperature
    top = float(np.max(scaled))
    if not np.isfinite(top):
        raise ValueError("no token is allowed")
    weights = np.exp(scaled - top)  # banned tokens (-inf) get weight 0
    vocab = weights.shape[0]
    if params.top_k <= 0 and params.top_p >= 1.0:
        cumulative = np.cumsum(weights)
        return int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    # Sorting 49k-262k weights every step is slow: grow the candidate set until it holds the nucleus.
    total = float(weights.sum())
    sizes = [params.top_k] if params.top_k > 0 else [64, 1024, vocab]
    for size in sizes:
        size = min(size, vocab)
        candidates = np.argpartition(-weights, size - 1)[:size] if size < vocab else np.arange(vocab)
        candidates = candidates[np.argsort(-weights[candidates], kind="stable")]
        probs = weights[candidates]
        mass = float(probs.sum()) if params.top_k > 0 else total
        cumulative = np.cumsum(probs) / mass
        if cumulative[-1] >= params.top_p or size == vocab or params.top_k > 0:
            cut = min(int(np.searchsorted(cumulative, params.top_p)) + 1, size)
            probs = probs[:cut] / probs[:cut].sum()
            return int(candidates[rng.choice(cut, p=probs)])
    raise AssertionError("unreachable: the last candidate set is the whole vocabulary")
