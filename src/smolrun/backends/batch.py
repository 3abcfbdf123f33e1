"""Continuous batching: many requests decoded together on one BatchModel, one forward pass a step.

Each step carries, for every live sequence, the tokens it has not evaluated yet: the token it sampled plus
those the grammar forced (fast-forward), or the next chunk of its prompt. Decoding sequences go first and
prompts fill the rest of the pass, so a long prompt never stalls the others. The grammar masks of a step
are filled in one call (llguidance's thread pool), then each sequence samples from its own logits. A
sequence keeps its tokens in its slot after its request (the prefix cache): the next request takes the free
slot whose cache its prompt extends, else an empty one, and shares the longest prefix any slot holds (a common
system prompt, a repeated prompt; llama.cpp tags the same cells with both sequences, nothing is recomputed,
and the cache counts them once).
When the shared KV cache is full, idle slots are emptied first, then the newest request is paused and
recomputed later (nothing is cut short).

Only the thread that calls `BatchLoop.step` touches the model: `BatchEngine` runs that thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
from llguidance import LLExecutor
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

from smolrun.backends.base import BatchModel, Feed, KVFull, Pixels, reusable_prefix, reusable_with_pixels
from smolrun.backends.decode import Prepared, SequenceState
from smolrun.errors import SHUTTING_DOWN, GenerationFailed, QueueFull, ServerShuttingDown
from smolrun.scheduler import Guarded, Sink
from smolrun.turn import FinishReason


@dataclass(eq=False)
class Job(Guarded):
    """One request in the loop: the tokens its sequence must hold, its decoding state, where events go (`send`:
    a sink that raises ends this request only)."""

    tokens: list[int]  # the prompt, then every generated token (the last ones perhaps not evaluated yet)
    pixels: tuple[Pixels, ...]
    state: SequenceState
    sink: Sink
    cancelled: Callable[[], bool]
    reuse: bool = True  # seeded requests evaluate their whole prompt, so that the same seed repeats; so do those
    # that score their prompt (every prompt token's logits)
    admitted: int = 0  # admission order (the newest is paused first when the cache is full)
    started: bool = False  # admitted once: the cached-token count is the first admission's

    @classmethod
    def of(cls, prepared: Prepared, model: BatchModel, sink: Sink, cancelled: Callable[[], bool]) -> Job:
        """A prepared turn as the loop takes it: its own decoding state, a fresh grammar matcher."""
        return cls(list(prepared.prompt), prepared.pixels, SequenceState.of(prepared, model), sink, cancelled,
                   reuse=prepared.params.seed is None and prepared.params.prompt_logprobs is None)


@dataclass(eq=False)
class Slot:
    """One llama.cpp sequence: what its KV cache holds, and the request using it (None: idle, kept as cache).

    `cells` names the KV cell behind each of its tokens: a prefix shared from another sequence has that
    sequence's cells, so the cache's use is the number of distinct cells, not the sum of the lengths."""

    seq: int
    tokens: list[int] = field(default_factory=list)
    cells: list[int] = field(default_factory=list)
    pixels: list[Pixels] = field(default_factory=list)  # pictures it holds whole (without their tiles)
    job: Job | None = None
    used: int = 0  # when it last served a request (least recently used is emptied first)

    def keep(self, n: int) -> None:
        """Forget everything past the first `n` tokens."""
        del self.tokens[n:], self.cells[n:]
        self.pixels = [p for p in self.pixels if p.end <= n]


class BatchLoop:
    def __init__(self, model: BatchModel) -> None:
        self.model = model
        self.slots = [Slot(seq) for seq in range(model.n_seq)]
        self.waiting: deque[Job] = deque()
        self._bitmask = allocate_token_bitmask(model.n_seq, model.lltokenizer.vocab_size)
        self._executor = LLExecutor()
        self._clock = 0
        self._cells = 0  # KV cells named so far (Slot.cells)
        self._held = False  # a request was paused for room: admit nothing until a running one ends
        self.peak = 0  # the most sequences one pass has carried
        self.on_dequeue: Callable[[Job], None] = lambda job: None  # a submitted job left the queue for good

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s.job is not None for s in self.slots)

    def submit(self, job: Job) -> None:
        self.waiting.append(job)

    def step(self) -> None:
        """Admit, evaluate one pass for every live sequence, sample where logits came back, retire."""
        self._clock += 1
        self._drop_cancelled()
        self._admit()
        plan = self._plan()
        if not plan:
            return
        if not self._fit(sum(len(feed.tokens) for _, feed in plan)):
            self._make_room()
            return
        self.peak = max(self.peak, len(plan))
        try:
            outputs = iter(self.model.decode([feed for _, feed in plan]))
        except KVFull:  # llama.cpp found no room for the pass (a fragmented cache): the same remedy
            self._make_room()
            return
        sampling: list[Slot] = []
        rows: list[npt.NDArray[np.float32]] = []
        for slot, feed in plan:
            self._evaluated(slot, feed.tokens)
            self._keep_pictures(slot)
            if not (feed.logits or feed.every):
                continue
            out = next(outputs)
            if feed.every:  # a prompt being scored: a row after each of its tokens
                job = slot.job
                assert job is not None
                job.state.score(feed.pos, out, job.tokens)
                out = out[-1]
            if feed.logits:
                sampling.append(slot)
                rows.append(out)
        self._sample(sampling, rows)

    def fail_all(self, error: BaseException) -> None:
        """After an engine failure: every request gets the error and every slot is emptied."""
        self._held = False
        for slot in self.slots:
            if slot.job is not None:
                slot.job.send(error)
                slot.job = None
            self.model.forget(slot.seq, 0)
            slot.keep(0)
        while self.waiting:
            job = self.waiting.popleft()
            if not job.started:
                self.on_dequeue(job)
            job.send(error)

    # -- admission ----------------------------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled():
                self._finish(slot, "cancelled")
        for job in [j for j in self.waiting if j.cancelled()]:
            self.waiting.remove(job)
            if not job.started:
                self.on_dequeue(job)
            job.state.finish("cancelled")
            job.send(job.state.take())
            job.send(None)

    def _admit(self) -> None:
        while self.waiting and not self._held and (free := [s for s in self.slots if s.job is None]):
            job = self.waiting.popleft()
            if not job.reuse and len(free) == len(self.slots):
                # A seeded request alone on the model starts from an empty cache, so its pass shapes (and so its
                # logits, to the last bit) are the same every time; beside others that cannot be promised.
                for slot in self.slots:
                    self._empty(slot)
            slot, common = self._best_slot(free, job)
            # Always drop past `common`: after a failure midway (a picture half encoded) the cache may hold more
            # than the slot records.
            if not self.model.forget(slot.seq, common):
                self.model.forget(slot.seq, 0)  # sliding-window caches cannot drop a suffix: start over
                common = 0
            slot.keep(common)
            common = self._borrow(slot, job, common)
            if not job.started:  # not a paused request coming back
                job.state.cached_tokens = common
                job.started = True
                self.on_dequeue(job)
            job.admitted = self._clock
            slot.job = job

    def _reusable(self, slot: Slot, job: Job) -> int:
        if not job.reuse:
            return 0
        return reusable_with_pixels(reusable_prefix(slot.tokens, job.tokens), slot.pixels, job.pixels)

    def _best_slot(self, free: list[Slot], job: Job) -> tuple[Slot, int]:
        """The free slot to use and the prefix it keeps: one whose whole cache the prompt extends (a follow-up,
        the code loop's next turn), else an empty one, which keeps the other caches, else the one sharing the
        longest prefix. Ties go to the least recently used."""
        def rank(slot: Slot) -> tuple[bool, bool, int, int]:
            kept = self._reusable(slot, job)
            return bool(slot.tokens) and kept >= len(slot.tokens) - 1, not slot.tokens, kept, -slot.used

        best = max(free, key=rank)
        return best, self._reusable(best, job)

    def _borrow(self, slot: Slot, job: Job, common: int) -> int:
        """Where another slot, busy or idle, holds a longer prefix of the prompt, copy it into `slot` (the cells
        are shared, not recomputed); the prefix `slot` now holds."""
        others = [(self._reusable(s, job), s) for s in self.slots if s is not slot]
        kept, donor = max(others, key=lambda o: o[0], default=(0, slot))
        if kept <= common or not self.model.share(donor.seq, slot.seq, common, kept):
            return common
        slot.tokens = donor.tokens[:kept]
        slot.cells += donor.cells[common:kept]
        slot.pixels = [p for p in donor.pixels if p.end <= kept]
        return kept

    # -- one pass -----------------------------------------------------------------------------------------

    def _plan(self) -> list[tuple[Slot, Feed]]:
        """The feeds of this pass: decoding sequences first, then prompt chunks, within n_batch tokens."""
        budget = self.model.n_batch
        plan: list[tuple[Slot, Feed]] = []
        live = sorted((s for s in self.slots if s.job is not None),
                      key=lambda s: (len(s.job.tokens) - len(s.tokens) > 1, s.job.admitted))  # type: ignore[union-attr]
        for slot in live:
            job = slot.job
            assert job is not None
            try:
                self._evaluate_tiles(slot)
            except Exception as exc:  # noqa: BLE001 - a picture that cannot be encoded ends only its request
                self._release(slot, exc)
                continue
            start = len(slot.tokens)
            end = min([len(job.tokens), *(at for at in self._tile_starts(job) if at > start)])
            take = min(end - start, budget)
            if take <= 0:
                continue
            scoring = job.state.params.prompt_logprobs is not None and start < job.state.prompt_tokens
            plan.append((slot, Feed(slot.seq, start, job.tokens[start:start + take], start + take == len(job.tokens),
                                    every=scoring)))
            budget -= take
            if budget == 0:
                break
        return plan

    @staticmethod
    def _tile_starts(job: Job) -> list[int]:
        return [at for p in job.pixels for at, _ in p.values.at] if job.pixels else []

    def _evaluate_tiles(self, slot: Slot) -> None:
        """Pictures are encoded outside the batched pass (libmtmd decodes their embeddings itself)."""
        job = slot.job
        assert job is not None
        tiles = {at: tile for p in job.pixels for at, tile in p.values.at}
        while (tile := tiles.get(len(slot.tokens))) is not None:
            at = len(slot.tokens)
            self.model.evaluate_tile(slot.seq, tile, at)
            self._evaluated(slot, job.tokens[at:at + tile[1]])
        self._keep_pictures(slot)

    @staticmethod
    def _keep_pictures(slot: Slot) -> None:
        """A picture counts as cached once all its tiles are: what it was is kept for reuse, not its tiles."""
        job = slot.job
        if job is None or not job.pixels:
            return
        held = {(p.start, p.digest) for p in slot.pixels}
        slot.pixels += [replace(p, values=None) for p in job.pixels
                        if p.end <= len(slot.tokens) and (p.start, p.digest) not in held]

    def _evaluated(self, slot: Slot, tokens: Sequence[int]) -> None:
        """`tokens` are now in `slot`'s cache, each in a new cell."""
        slot.tokens += tokens
        slot.cells += range(self._cells, self._cells + len(tokens))
        self._cells += len(tokens)

    def _used(self) -> int:
        """KV cells in use: shared ones once."""
        return len({cell for s in self.slots for cell in s.cells})

    def _fit(self, incoming: int) -> bool:
        """Empty idle slots (least recently used first) until the cache has room for `incoming` more tokens;
        whether it has."""
        room = self.model.n_ctx - incoming
        if sum(len(s.cells) for s in self.slots) <= room:  # the common case, without counting shared cells
            return True
        for slot in sorted((s for s in self.slots if s.job is None and s.tokens), key=lambda s: s.used):
            if self._used() <= room:
                break
            self._empty(slot)
        return self._used() <= room

    def _make_room(self) -> None:
        """The pass does not fit: empty an idle slot, else pause the newest request, which waits (and nothing
        new is admitted) until a running one ends; it is then recomputed where it stopped."""
        idle = [s for s in self.slots if s.job is None and s.tokens]
        if idle:
            self._empty(min(idle, key=lambda s: s.used))
            return
        live = [s for s in self.slots if s.job is not None]
        if len(live) == 1:
            self._release(live[0], GenerationFailed(f"the KV cache of {self.model.n_ctx} tokens cannot hold this "
                                                 "request"))
            return
        newest = max(live, key=lambda s: s.job.admitted)  # type: ignore[union-attr]
        job = newest.job
        assert job is not None
        newest.job = None
        self._empty(newest)
        self.waiting.appendleft(job)
        self._held = True

    def _empty(self, slot: Slot) -> None:
        self.model.forget(slot.seq, 0)
        slot.keep(0)

    def _sample(self, slots: list[Slot], logits: Sequence[npt.NDArray[np.float32]]) -> None:
        jobs = [s.job for s in slots]
        masked = [(job.state.matcher, i) for i, job in enumerate(jobs) if job is not None and job.state.matcher]
        spent = 0.0
        if masked:
            started = time.perf_counter()
            fill_next_token_bitmask_par(self._executor, masked, self._bitmask)
            spent = (time.perf_counter() - started) * 1e6 / len(masked)
        for i, (slot, row) in enumerate(zip(slots, logits, strict=True)):
            job = slot.job
            assert job is not None
            state = job.state
            try:
                if state.matcher is not None:
                    state.mask_us.append(spent)
                more = state.step(row, self._bitmask[i:i + 1] if state.matcher is not None else None)
            except Exception as exc:  # noqa: BLE001 - a grammar error ends only its own request
                self._release(slot, exc)
                continue
            job.tokens += more
            events = state.take()
            if events:
                job.send(events)
            if state.done or job.failed:
                self._release(slot)

    # -- the end of a request -----------------------------------------------------------------------------

    def _finish(self, slot: Slot, reason: FinishReason) -> None:
        job = slot.job
        assert job is not None
        job.state.finish(reason)
        job.send(job.state.take())
        self._release(slot)

    def _release(self, slot: Slot, error: BaseException | None = None) -> None:
        """The request leaves its slot, whose tokens stay as cache; its sink hears the end, or the error. A
        request whose sink failed leaves its slot empty: its sequence and KV cells are freed for the others."""
        job = slot.job
        assert job is not None
        slot.job = None
        self._held = False
        slot.used = self._clock
        if not job.send(error):
            self._empty(slot)


class BatchEngine:
    """The thread that owns a BatchModel: requests arrive through `submit`, at most `max_queue` of them
    waiting for a sequence (then QueueFull, a 429), and join the running batch at the next step."""

    def __init__(self, model: BatchModel, max_queue: int) -> None:
        self.model = model
        self.max_queue = max_queue
        self._loop = BatchLoop(model)
        self._loop.on_dequeue = self._dequeued
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0  # submitted, not yet in a sequence
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="smolrun-batch", daemon=True)
        self._thread.start()

    def submit(self, prepared: Prepared, sink: Sink, cancelled: Callable[[], bool], bounded: bool = True) -> None:
        """Join a prepared turn to the batch (see enqueue)."""
        self.enqueue(Job.of(prepared, self.model, sink, cancelled), bounded)

    def enqueue(self, job: Job, bounded: bool = True) -> None:
        """`bounded`: refused (QueueFull) when max_queue requests wait; a later turn of an admitted response is
        not, so that nothing accepted is lost. After close(), ServerShuttingDown (a 503)."""
        with self._lock:  # put under the lock: nothing lands behind close()'s end marker, where nobody reads it
            if self._closed:
                raise ServerShuttingDown(SHUTTING_DOWN)
            if bounded and self._waiting >= self.max_queue:
                raise QueueFull("the model is busy: too many requests are waiting; retry shortly")
            self._waiting += 1
            self._inbox.put(job)

    def _dequeued(self, job: Job) -> None:
        with self._lock:
            self._waiting -= 1

    def waiting(self) -> int:
        with self._lock:
            return self._waiting

    def running(self) -> int:
        """Requests in a sequence now, read from another thread (a gauge: a step may be changing them)."""
        return sum(slot.job is not None for slot in self._loop.slots)

    def kv_used(self) -> int | None:
        """KV cells in use, shared ones once, read from another thread: each slot's cells are copied first (a
        slice is one step under the GIL), so the loop's thread may change them meanwhile."""
        return len({cell for cells in [slot.cells[:] for slot in self._loop.slots] for cell in cells})

    def _run(self) -> None:
        loop = self._loop
        while self._take(wait=not loop.busy):
            try:
                loop.step()
            except Exception as exc:  # noqa: BLE001 - the engine failed: every request hears it, the thread lives
                loop.fail_all(GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}"))
        loop.fail_all(ServerShuttingDown(SHUTTING_DOWN))  # close(): every live and queued request hears why

    def _take(self, wait: bool) -> bool:
        """Hand what arrived to the loop, to join its next step (idle: sleep until a request comes); False once
        close() has said stop."""
        if wait:
            job = self._inbox.get()
            if job is None:
                return False
            self._loop.submit(job)
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            self._loop.submit(job)

    def close(self) -> None:
        """End every live and queued request with ServerShuttingDown, and return once the thread has exited. No
        timeout: it stops at its next step (after one forward pass at most), and a thread left running would
        drive the model beside the next runner's."""
        with self._lock:
            self._closed = True
            self._inbox.put(None)
        self._thread.join()
