"""Pick the next token from raw logits and an optional grammar bitmask, in numpy.

This runs once per token on the loop's thread, right after a forward pass has flushed the CPU's caches, so it
touches as little memory as it can: a draw exponentiates only the tokens near the top (exact, see _draw); a
flat distribution and the nucleus path work in preallocated float32 buffers, a flat one's draw through a
two-level cumulative sum; a grammar mask is applied only when the token drawn without it is banned (exact, see
sample)."""

from __future__ import annotations

import math
import threading

import numpy as np
import numpy.typing as npt

from smolrun.turn import SamplingParams

Logits = npt.NDArray[np.float32]
Bitmask = npt.NDArray[np.int32]  # shape (1, ceil(V/32)); token t allowed iff bit t%32 of word t//32 is set

BLOCK = 256  # tokens per block of the dense draw: a cumsum over V/256 block sums, then over one block


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
        token = _draw(logits, params.temperature, rng)
        if allowed(bitmask, token):
            return token
        logits = mask_logits(logits, bitmask, buffers.masked)
    return _draw(logits, params.temperature, rng)


def greedy(logits: Logits, bitmask: Bitmask | None) -> int:
    best = int(np.argmax(logits))
    # Most steps the model's favourite is allowed: test its bit instead of masking the whole vocabulary.
    if bitmask is None or allowed(bitmask, best):
        return best
    return int(np.argmax(mask_logits(logits, bitmask, _buffers(logits.shape[0]).masked)))


def _weights(logits: Logits, temperature: float, buffers: _Buffers) -> npt.NDArray[np.float32]:
    """exp((logits - max) / temperature) in the padded weight buffer (banned tokens, at -inf, get 0)."""
    _scaled_exp(logits, _top(logits), temperature, out=buffers.weights[: logits.shape[0]])
    return buffers.weights


def _scaled_exp(logits: Logits, top: float, temperature: float, out: Logits) -> Logits:
    """exp((logits - top) / temperature), written to `out` (which may be `logits` itself)."""
    np.subtract(logits, np.float32(top), out=out)
    np.multiply(out, np.float32(1.0 / temperature), out=out)
    return np.exp(out, out=out)


def _top(logits: Logits) -> float:
    top = float(np.max(logits))
    if not np.isfinite(top):
        raise ValueError("no token is allowed")
    return top


def _draw(logits: Logits, temperature: float, rng: np.random.Generator, tail: float | None = None) -> int:
    """A token drawn from softmax(logits / temperature), exactly, exponentiating only the head: the tokens within
    `tail` temperatures of the top (default ln V). Rejection sampling: propose a head token by its weight, or
    any other token with the bound weight e^-tail (relative to the top's), which no tail token exceeds; a
    proposed tail token is kept with probability (its weight) / (the bound), else the draw starts over. What is
    kept is each token in proportion to its weight, the head's and the tail's alike. With tail = ln V the
    bounds sum to at most the top token's weight: at most half the proposals go to the tail, and restarts cost
    a few scalar draws, not a pass over the vocabulary."""
    top = _top(logits)
    size = logits.shape[0]
    tail = math.log(size) if tail is None else tail
    cut = np.float32(top - tail * temperature)  # one value for the head's test and the tail's, so no token is both
    near = logits >= cut
    if np.count_nonzero(near) * 4 > size:  # a flat distribution: every token weighed, none left to propose
        return _dense(_weights(logits, temperature, _buffers(size)), rng)
    head = np.flatnonzero(near)
    gathered = logits[head]
    weights = _scaled_exp(gathered, top, temperature, out=gathered)
    cumulative = np.cumsum(weights, dtype=np.float64)
    bound = math.exp(-tail)
    total = cumulative[-1] + (size - head.shape[0]) * bound
    while True:
        point = rng.random() * total
        if point < cumulative[-1]:
            index = min(int(np.searchsorted(cumulative, point, side="right")), head.shape[0] - 1)
            while weights[index] <= 0:  # rounding put the point past the last token with weight
                index -= 1
            return int(head[index])
        token = int(rng.integers(size))  # uniform over the tail: redrawn while it lands in the head
        while logits[token] >= cut:
            token = int(rng.integers(size))
        if rng.random() * bound < math.exp((float(logits[token]) - top) / temperature):
            return token


def _dense(weights: npt.NDArray[np.float32], rng: np.random.Generator) -> int:
    """A token drawn in proportion to `weights` (padded to whole blocks): the block first, then within it."""
    # Block sums in float32 (a few hundred weights each, rounding ~1e-7 of the block); across blocks in float64.
    blocks = weights.reshape(-1, BLOCK).sum(axis=1)
    cumulative = np.cumsum(blocks, dtype=np.float64)
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
