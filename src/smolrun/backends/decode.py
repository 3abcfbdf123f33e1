"""The decode loop: mask, sample, fast-forward forced tokens in one batch, stop; engine-independent."""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import numpy.typing as npt
from llguidance import LLMatcher
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from smolrun.backends.base import Model, Pixels
from smolrun.backends.sampling import sample
from smolrun.errors import ContextLengthExceeded, GenerationFailed
from smolrun.turn import DecodeStats, Done, Event, FinishReason, SamplingParams, TextDelta


def never() -> bool:
    return False


def decode(
    model: Model,
    prompt: Sequence[int],
    params: SamplingParams,
    matcher: LLMatcher | None = None,
    cancelled: Callable[[], bool] = never,
    pixels: Sequence[Pixels] = (),
) -> Iterator[Event]:
    """Generate from `prompt`, yielding text deltas then one Done.

    With a matcher every token is allowed by the grammar; tokens the grammar forces are appended to the
    next forward pass together (fast-forward). A matcher error raises GenerationFailed: an answer is never
    silently cut short.
    """
    budget = token_budget(model.n_ctx, len(prompt), params.max_tokens)
    rng = np.random.default_rng(params.seed)
    bitmask = allocate_token_bitmask(1, model.lltokenizer.vocab_size) if matcher is not None else None
    text = _TextStream(params.stop)
    mask_us: list[float] = []
    generated = forced = passes = 0
    penalties = _Penalties(params.frequency_penalty, params.presence_penalty)
    reason: FinishReason = "length"
    unsent: list[int] = []  # tokens whose text is not yet out (held back for stop sequences or UTF-8)

    t0 = time.perf_counter()
    logits = model.prefill(prompt, reuse=params.seed is None, pixels=pixels)  # seeded runs must repeat exactly
    t1 = time.perf_counter()
    passes += 1
    while generated < budget:
        if cancelled():
            reason = "cancelled"
            break
        if matcher is not None and bitmask is not None:
            tm = time.perf_counter()
            fill_next_token_bitmask(matcher, bitmask)
            mask_us.append((time.perf_counter() - tm) * 1e6)
            _check(matcher)
        penalties.apply(logits)
        token = sample(logits, bitmask, params, rng)
        if token in model.eog_tokens:
            if matcher is not None:
                _consume(matcher, [token])
            reason = "stop"
            break
        batch = [token]
        if matcher is not None:
            _consume(matcher, batch)
            ff = matcher.compute_ff_tokens()[: budget - generated - 1]
            if ff:
                _consume(matcher, ff)
                batch += ff
                forced += len(ff)
        generated += len(batch)
        penalties.add(batch)
        unsent += batch
        delta, stopped = text.push(b"".join(model.token_bytes(t) for t in batch))
        if delta:
            yield TextDelta(delta, tuple(unsent))
            unsent = []
        if stopped:
            reason = "stop"
            break
        if matcher is not None and matcher.is_stopped():
            reason = "stop"
            break
        if generated >= budget:
            break
        logits = model.extend(batch)
        passes += 1
    tail = text.flush()
    if tail:
        yield TextDelta(tail, tuple(unsent))
    stats = DecodeStats(
        prompt_tokens=len(prompt),
        completion_tokens=generated,
        forced_tokens=forced,
        forward_passes=passes,
        prefill_s=t1 - t0,
        decode_s=time.perf_counter() - t1,
        mask_us=tuple(mask_us),
    )
    yield Done(reason, stats)


def token_budget(n_ctx: int, n_prompt: int, max_tokens: int | None) -> int:
    """How many tokens may be generated; ContextLengthExceeded when the request cannot fit."""
    room = n_ctx - n_prompt
    if room <= 0:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {n_ctx} tokens, but the messages use {n_prompt}.",
            param="messages",
        )
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the messages, {max_tokens} in the completion).",
            param="max_tokens",
        )
    return max_tokens


def _consume(matcher: LLMatcher, tokens: list[int]) -> None:
    if not matcher.consume_tokens(tokens):
        _check(matcher)
        raise GenerationFailed(f"the grammar rejected tokens {tokens}")
    _check(matcher)


def _check(matcher: LLMatcher) -> None:
    if matcher.is_error():
        raise GenerationFailed(f"grammar matcher failed: {matcher.get_error()}")


class _Penalties:
    """OpenAI's frequency and presence penalties over the tokens generated so far (forced ones included)."""

    def __init__(self, frequency: float, presence: float) -> None:
        self.frequency, self.presence = frequency, presence
        self.counts: dict[int, int] = {}

    def add(self, tokens: list[int]) -> None:
        if self.frequency or self.presence:
            for t in tokens:
                self.counts[t] = self.counts.get(t, 0) + 1

    def apply(self, logits: npt.NDArray[np.float32]) -> None:
        if not self.counts:
            return
        ids = np.fromiter(self.counts.keys(), dtype=np.intp, count=len(self.counts))
        counts = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
        logits[ids] -= counts * np.float32(self.frequency) + np.float32(self.presence)


class _TextStream:
    """Bytes -> text deltas: whole UTF-8 characters only, holding back what may start a stop sequence."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._pending = ""  # decoded text not yet emitted
        self.hit_stop = False

    def push(self, data: bytes) -> tuple[str, bool]:
        self._pending += self._decoder.decode(data)
        if not self._stop:
            out, self._pending = self._pending, ""
            return out, False
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self._pending = self._pending[:cut], ""
            self.hit_stop = True
            return out, True
        hold = max((overlap(self._pending, s) for s in self._stop), default=0)
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out, False

    def flush(self) -> str:
        rest = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return "" if self.hit_stop else rest


def overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
