"""The decode loop: mask, sample, fast-forward forced tokens in one batch, stop; engine-independent."""

from __future__ import annotations

import codecs
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
from llguidance import LLMatcher
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from smolrun.backends.base import Model, Pixels
from smolrun.backends.closing import Closer, Closing
from smolrun.backends.parts import PLAIN, PartReader, Parts, Piece, Segment
from smolrun.backends.repetition import Dry
from smolrun.backends.sampling import Bitmask, Rng, mask_logits, sample
from smolrun.constraints.grammar import Grammar
from smolrun.errors import ContextLengthExceeded, GenerationFailed
from smolrun.thinking import ThinkBlock
from smolrun.turn import (
    DecodeStats,
    Done,
    Event,
    FinishReason,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)


def never() -> bool:
    return False


@dataclass(frozen=True)
class Prepared:
    """A turn ready to decode: checked, compiled and tokenized (every 400 is raised before this). Every runner
    takes it as it is (backends.base.Runner)."""

    prompt: list[int]
    grammar: Grammar | None
    params: SamplingParams
    think: ThinkBlock | None = None  # the turn starts with a think block
    pixels: tuple[Pixels, ...] = ()  # the pictures at the prompt's image tokens
    closing: Closing | None = None  # a JSON answer, closed within the budget
    plan: tuple[int, ...] | None = None  # a closing from the grammar's start (None: the search found none)
    parts: Parts = PLAIN  # the think block and the branches, as the decoder tells them apart

    def matcher(self) -> LLMatcher | None:
        """A fresh grammar matcher for one decoding of the turn."""
        return self.grammar.matcher() if self.grammar is not None else None


class Vocab(Protocol):
    """What a decoding state needs of its model, whichever engine runs it."""

    n_ctx: int
    eog_tokens: frozenset[int]

    def token_bytes(self, token: int) -> bytes: ...


class SequenceState:
    """One request's decoding, as a value the loop drives: sampler and RNG, grammar, penalties, stop sequences,
    budget, and the closing of a JSON answer at that budget (`closing`; `plan` is a closing from the grammar's
    start, found when the request was admitted). Both loops use it: `decode` over a model with one sequence,
    and the batch step over many (backends/batch.py), so a request decodes the same alone or in a batch. The
    loop owns the model.
    """

    def __init__(self, prompt_tokens: int, n_ctx: int, params: SamplingParams, matcher: LLMatcher | None,
                 eog_tokens: frozenset[int], token_bytes: Callable[[int], bytes], closing: Closing | None = None,
                 plan: tuple[int, ...] | None = None, parts: Parts = PLAIN) -> None:
        self.budget = token_budget(n_ctx, prompt_tokens, params.max_tokens)
        self.params = params
        self.matcher = matcher
        self.eog_tokens = eog_tokens
        self.token_bytes = token_bytes
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0  # set by the loop once it knows how much of the prompt the cache held
        self.rng = Rng(params.seed)
        self.text = _TextStream(params.stop)
        self.penalties = _Penalties(params.frequency_penalty, params.presence_penalty)
        self.dry = Dry(params.dry_multiplier or 0.0, params.dry_base, params.dry_allowed_length, token_bytes)
        self.closer = Closer(matcher, closing, plan) if matcher is not None and closing is not None else None
        self.closed = False  # the answer was closed at the budget
        self.generated = self.forced = self.passes = 0
        self.mask_us: list[float] = []
        self.unsent: list[int] = []  # tokens whose text is not yet out (held back for stop sequences or UTF-8)
        self.parts = PartReader(parts, token_bytes)
        self.logprobs: deque[TokenLogprob] = deque()  # of the tokens given to `parts`, not yet out of it
        self.unsent_logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob] = []  # of prompt tokens 1.., when params.prompt_logprobs is set
        self.piece: Piece = "text"  # the part of the turn whose text the stream holds
        self.events: list[Event] = []  # produced, not yet taken
        self.reason: FinishReason | None = None
        self.started = time.perf_counter()
        self.prefilled: float | None = None  # when the first logits came

    @classmethod
    def of(cls, prepared: Prepared, model: Vocab) -> SequenceState:
        """A prepared turn's own decoding state on `model` (a fresh grammar matcher)."""
        return cls(len(prepared.prompt), model.n_ctx, prepared.params, prepared.matcher(), model.eog_tokens,
                   model.token_bytes, prepared.closing, prepared.plan, prepared.parts)

    @property
    def done(self) -> bool:
        return self.reason is not None

    def fill_mask(self, bitmask: Bitmask) -> None:
        """The grammar's mask for the next token (the batch loop fills all its rows in one call instead)."""
        assert self.matcher is not None
        started = time.perf_counter()
        fill_next_token_bitmask(self.matcher, bitmask)
        self.mask_us.append((time.perf_counter() - started) * 1e6)

    def step(self, logits: npt.NDArray[np.float32], bitmask: Bitmask | None) -> list[int]:
        """Sample from `logits` (a mask for this sequence already filled in `bitmask`) and fast-forward: the
        tokens to evaluate next, or [] when the sequence has ended. A grammar error raises GenerationFailed."""
        self._pass()
        if self.matcher is not None:
            _check(self.matcher)
        if self.closer is not None and (closing := self.closer.before(self.budget - self.generated)) is not None:
            return self._close(closing)
        raw = logits.copy() if self.params.logprobs is not None else None  # penalties change logits in place
        self.penalties.apply(logits)
        if self.closer is None:
            self.dry.apply(logits)
        elif self.closer.scan.phase == "json":  # with a JSON answer, inside it only
            self.dry.apply(logits)
            if self.dry.on:
                self.closer.lean(logits, self.budget - self.generated, self.budget)
        mask = bitmask if self.matcher is not None else None
        scores = _Scores(raw, mask, self.params.logprobs or 0) if raw is not None else None
        token = sample(logits, mask, self.params, self.rng)
        return self._advance(token, fast_forward=True, logprob=scores.of(token) if scores is not None else None)

    def score(self, start: int, rows: npt.NDArray[np.float32], tokens: Sequence[int]) -> None:
        """Rows of logits after the positions from `start` on: the logprob of the prompt token each predicts,
        once each (a paused request recomputes its prompt, which is not scored again)."""
        top = self.params.prompt_logprobs
        if top is None:
            return
        for k in range(rows.shape[0]):
            at = start + k + 1  # the token this row predicts
            if len(self.prompt_logprobs) + 1 == at < self.prompt_tokens:
                self.prompt_logprobs.append(_Scores(rows[k], None, top).of(tokens[at]))

    def replay(self, token: int) -> None:
        """Take a token that another engine sampled (vLLM) as if sampled here: the grammar must allow it, or
        GenerationFailed says so. No fast-forward: the other engine returns forced tokens as tokens too."""
        self._pass()
        if self.matcher is not None and not self.matcher.is_error() and not self.matcher.consume_tokens([token]):
            raise GenerationFailed(f"the engine returned token {token} ({self.token_bytes(token)!r}) after "
                                   f"{self.generated} tokens, which the grammar does not allow there")
        self._advance(token, fast_forward=False, consumed=True)

    def _pass(self) -> None:
        if self.prefilled is None:
            self.prefilled = time.perf_counter()
        self.passes += 1

    def _advance(self, token: int, fast_forward: bool, consumed: bool = False,
                 logprob: TokenLogprob | None = None) -> list[int]:
        matcher = self.matcher
        if token in self.eog_tokens:
            if matcher is not None and not consumed:
                _consume(matcher, [token])
            self.finish("stop")
            return []
        batch = [token]
        if matcher is not None:
            if not consumed:
                _consume(matcher, batch)
            _check(matcher)
            ff = matcher.compute_ff_tokens()[: self.budget - self.generated - 1] if fast_forward else []
            if ff:
                _consume(matcher, ff)
                batch += ff
            if fast_forward and self.closer is not None:
                kept = self.closer.after(batch, self.budget - self.generated - len(batch))
                if kept is not batch:
                    return self._close(kept)
            self.forced += len(ff)
        return self._emit(batch, sampled=logprob)

    def _close(self, closing: list[int]) -> list[int]:
        """Write the closing of the answer (already consumed by the grammar) and end: the budget is spent."""
        self.closed = True
        return self._emit(closing, closed=True)

    def _emit(self, batch: list[int], closed: bool = False, sampled: TokenLogprob | None = None) -> list[int]:
        matcher = self.matcher
        if self.params.logprobs is not None:  # the rest were forced (or written by the closing): probability 1
            self.logprobs += [sampled or TokenLogprob(t, 0.0, ((t, 0.0),)) for t in batch[:1]]
            self.logprobs += [TokenLogprob(t, 0.0, ((t, 0.0),)) for t in batch[1:]]
        self.generated += len(batch)
        self.penalties.add(batch)
        self.dry.add(batch)
        stopped = self._text(self.parts.read(batch))
        if closed:
            self.finish("length")
        elif stopped or (matcher is not None and matcher.is_stopped()):
            self.finish("stop")
        elif self.generated >= self.budget:
            self.finish("length")
        return [] if self.done else batch

    def _text(self, segments: list[Segment]) -> bool:
        """The segments' text out as events of their part; whether a stop sequence ended it."""
        for segment in segments:
            if segment.piece != self.piece:  # a new part: what the stream held of the last one goes out first
                self._event(self.text.flush())
                self.piece = segment.piece
            self.unsent += segment.tokens
            if self.params.logprobs is not None:
                self.unsent_logprobs += [self.logprobs.popleft() for _ in segment.tokens]
            delta, stopped = self.text.push(segment.data)
            self._event(delta)
            if stopped:
                return True
        return False

    def _event(self, text: str) -> None:
        if not text:
            return
        if self.piece == "thought":  # the think block's tokens are counted in reasoning_tokens, not here
            self.events.append(ReasoningDelta(text))
        else:
            self.events.append(TextDelta(text, tuple(self.unsent), self.piece, tuple(self.unsent_logprobs)))
        self.unsent, self.unsent_logprobs = [], []

    def finish(self, reason: FinishReason) -> None:
        """End the sequence: the held-back text, then Done."""
        if self.done:
            return
        self.reason = reason
        if not self.text.hit_stop:
            self._text(self.parts.flush())
        self._event(self.text.flush())
        now = time.perf_counter()
        prefilled = self.prefilled or now
        self.events.append(Done(reason, stats=DecodeStats(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.generated,
            forced_tokens=self.forced,
            forward_passes=self.passes,
            prefill_s=prefilled - self.started,
            decode_s=now - prefilled,
            mask_us=tuple(self.mask_us),
            reasoning_tokens=self.parts.thought_tokens,
            cached_tokens=self.cached_tokens,
            closed=self.closed,
            close_us=tuple(self.closer.search_us) if self.closer is not None else (),
        ), prompt_logprobs=tuple(self.prompt_logprobs)))

    def take(self) -> list[Event]:
        events, self.events = self.events, []
        return events


def decode(
    model: Model,
    prompt: Sequence[int],
    params: SamplingParams,
    matcher: LLMatcher | None = None,
    cancelled: Callable[[], bool] = never,
    pixels: Sequence[Pixels] = (),
    closing: Closing | None = None,
    plan: tuple[int, ...] | None = None,
    parts: Parts = PLAIN,
) -> Iterator[Event]:
    """Generate from `prompt` on a model with one sequence, yielding text deltas then one Done.

    With a matcher every token is allowed by the grammar; tokens the grammar forces are appended to the
    next forward pass together (fast-forward). A matcher error raises GenerationFailed: an answer is never
    silently cut short. With `closing`, a JSON answer is closed within the budget (see SequenceState).
    """
    state = SequenceState(len(prompt), model.n_ctx, params, matcher, model.eog_tokens, model.token_bytes, closing,
                          plan, parts)
    bitmask = allocate_token_bitmask(1, model.lltokenizer.vocab_size) if matcher is not None else None
    logits = model.prefill(prompt, reuse=params.seed is None, pixels=pixels)  # seeded runs must repeat exactly
    state.cached_tokens = model.reused
    while not state.done:
        if cancelled():
            state.finish("cancelled")
            break
        if bitmask is not None:
            state.fill_mask(bitmask)
        feed = state.step(logits, bitmask)
        yield from state.take()
        if feed:
            logits = model.extend(feed)
    yield from state.take()


def decode_prepared(model: Model, prepared: Prepared, cancelled: Callable[[], bool] = never) -> Iterator[Event]:
    """`decode` of a prepared turn."""
    return decode(model, prepared.prompt, prepared.params, prepared.matcher(), cancelled, prepared.pixels,
                  prepared.closing, prepared.plan, prepared.parts)


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


class _Scores:
    """One step's log probabilities, from the raw logits under the grammar's mask: the log normaliser and the
    `top` likeliest tokens, computed before sampling (the sampler's penalties change the logits)."""

    def __init__(self, raw: npt.NDArray[np.float32], mask: Bitmask | None, top: int) -> None:
        self.row = mask_logits(raw, mask) if mask is not None else raw
        peak = float(np.max(self.row))
        self.norm = peak + float(np.log(np.sum(np.exp(self.row.astype(np.float64) - peak))))
        self.top: tuple[tuple[int, float], ...] = ()
        if top > 0:
            best = np.argpartition(-self.row, min(top, self.row.shape[0] - 1))[:top]
            best = best[np.argsort(-self.row[best], kind="stable")]
            self.top = tuple((int(t), float(self.row[t]) - self.norm) for t in best if np.isfinite(self.row[t]))

    def of(self, token: int) -> TokenLogprob:
        return TokenLogprob(token, float(self.row[token]) - self.norm, self.top)


class _Penalties:
    """OpenAI's frequency and presence penalties over the tokens generated so far (forced ones included), kept
    as each seen token's total penalty, so that a step subtracts them in one indexed pass."""

    def __init__(self, frequency: float, presence: float) -> None:
        self.frequency, self.presence = frequency, presence
        self.counts: dict[int, int] = {}
        self._slots: dict[int, int] = {}  # token -> its place in _ids and _amounts
        self._ids = np.zeros(64, dtype=np.intp)
        self._amounts = np.zeros(64, dtype=np.float32)

    def add(self, tokens: list[int]) -> None:
        if not (self.frequency or self.presence):
            return
        for t in tokens:
            count = self.counts[t] = self.counts.get(t, 0) + 1
            slot = self._slots.get(t)
            if slot is None:
                slot = self._slots[t] = len(self._slots)
                if slot == self._ids.shape[0]:
                    self._ids = np.concatenate([self._ids, np.zeros_like(self._ids)])
                    self._amounts = np.concatenate([self._amounts, np.zeros_like(self._amounts)])
                self._ids[slot] = t
            self._amounts[slot] = count * self.frequency + self.presence

    def apply(self, logits: npt.NDArray[np.float32]) -> None:
        n = len(self._slots)
        if n:
            logits[self._ids[:n]] -= self._amounts[:n]


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
