"""How a turn waits for its model: admitted at once (or QueueFull, a 429), then its events stream back to asyncio.

Three runners sit behind the engine seam (backends.factory.Runner): `Scheduler` (a thread running one turn at a
time, for models with one sequence), `backends.batch.BatchEngine` (continuous batching) and
`backends.vllm.VllmRunner`. Each hands events over to a sink, an `EventStream` for the routes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from smolrun.backends.base import Model
from smolrun.backends.decode import Prepared, decode_prepared
from smolrun.errors import SHUTTING_DOWN, QueueFull, ServerShuttingDown
from smolrun.turn import Done, Event, ReasoningDelta, TextDelta

Item = list[Event] | BaseException | None  # what a runner sends: events, an error, or None at the end
Sink = Callable[[Item], None]
Work = Callable[[Callable[[], bool]], Iterator[Event]]  # given "is it cancelled?", yields events

log = logging.getLogger("smolrun")


class Guarded:
    """A runner's request whose sink may raise (its event loop closed, a bug): `send` hands an item over and
    says whether the request still listens. The first failure is logged at ERROR and every later item is
    dropped; the runner then ends that request only, so that one broken sink never takes the runner's thread,
    and every other request with it."""

    sink: Sink
    failed = False

    def send(self, item: Item) -> bool:
        if not self.failed:
            try:
                self.sink(item)
            except Exception as exc:  # noqa: BLE001 - whatever it is, it ends this request only
                self.failed = True
                log.error("a request's event sink failed: the request is dropped", exc_info=exc)
        return not self.failed


class EventStream:
    """The events of one admitted turn, as an async iterator. Leaving early (an exception, a cancelled task,
    `aclose`, or dropping it) cancels the turn, which its runner notices at the next token.

    Deltas that come within `interval` seconds of the last hand-over wait for the next one, and reach the route
    merged (adjacent text of one branch, adjacent thoughts): when tokens come faster than that, the event loop
    wakes, and the response writes a chunk, once per interval instead of once per token, which on a small CPU
    leaves those cycles to the forward pass. The first events, the end and errors are handed over at once."""

    def __init__(self, interval: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = asyncio.get_running_loop()
        self.cancelled = threading.Event()
        self.interval = interval
        self._clock = clock
        self._items: asyncio.Queue[Item] = asyncio.Queue()
        self._ready: deque[Event] = deque()
        self._held: list[Event] = []  # touched on the runner's thread only
        self._handed = -math.inf  # when events were last handed over
        self._ended = False

    def sink(self, item: Item) -> None:
        """Called from the runner's thread."""
        if isinstance(item, list):
            self._held += item
            now = self._clock()
            if now - self._handed < self.interval and not any(isinstance(e, Done) for e in item):
                return
            self._handed = now
            item, self._held = self._held, []
        elif self._held:  # the end, or an error: what is held goes first
            held, self._held = self._held, []
            self.loop.call_soon_threadsafe(self._items.put_nowait, held)
        self.loop.call_soon_threadsafe(self._items.put_nowait, item)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        try:
            while not self._ready:
                if self._ended:
                    raise StopAsyncIteration
                item = await self._items.get()
                if item is None:
                    self._ended = True
                    self.cancelled.set()
                elif isinstance(item, BaseException):
                    self._ended = True
                    raise item
                else:
                    self._ready.extend(merged(item))
        except BaseException:
            self.cancelled.set()
            raise
        return self._ready.popleft()

    async def aclose(self) -> None:
        self.cancelled.set()

    def __del__(self) -> None:
        self.cancelled.set()


def merged(events: list[Event]) -> list[Event]:
    """`events` with each run of text deltas of one branch, and each run of thoughts, as one delta."""
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, TextDelta) and isinstance(last, TextDelta) and last.branch == event.branch:
            out[-1] = TextDelta(last.text + event.text, last.tokens + event.tokens, event.branch,
                                last.logprobs + event.logprobs)
        elif isinstance(event, ReasoningDelta) and isinstance(last, ReasoningDelta):
            out[-1] = ReasoningDelta(last.text + event.text)
        else:
            out.append(event)
    return out


@dataclass
class _Job(Guarded):
    work: Work
    sink: Sink
    cancelled: Callable[[], bool]


@dataclass
class Scheduler:
    """Runs turns one at a time, in arrival order, on one thread that owns the model (`model`; without one it
    runs work given to `enqueue`)."""

    max_queue: int
    model: Model | None = None
    _jobs: queue.Queue[_Job | None] = field(init=False)
    _thread: threading.Thread = field(init=False)
    _closing: threading.Event = field(init=False, default_factory=threading.Event)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _serving: bool = field(init=False, default=False)  # a turn is being generated

    def __post_init__(self) -> None:
        self._jobs = queue.Queue()  # bounded by submit, so that a continuing turn is never refused
        self._thread = threading.Thread(target=self._run, name="smolrun-model", daemon=True)
        self._thread.start()

    def submit(self, prepared: Prepared, sink: Sink, cancelled: Callable[[], bool], bounded: bool = True) -> None:
        """Decode a prepared turn on the model, in its turn (see enqueue)."""
        model = self.model
        assert model is not None, "a Scheduler without a model runs only work given to enqueue"
        self.enqueue(lambda stop: decode_prepared(model, prepared, stop), sink, cancelled, bounded)

    def enqueue(self, work: Work, sink: Sink, cancelled: Callable[[], bool], bounded: bool = True) -> None:
        """`bounded`: refused (QueueFull) when max_queue turns wait; a later turn of an admitted response is not.
        After close(), ServerShuttingDown (a 503)."""
        with self._lock:  # nothing lands behind close()'s end marker, where nobody would serve it
            if self._closing.is_set():
                raise ServerShuttingDown(SHUTTING_DOWN)
            if bounded and self._jobs.qsize() >= self.max_queue:
                raise QueueFull("the model is busy: too many requests are waiting; retry shortly")
            self._jobs.put_nowait(_Job(work, sink, cancelled))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._serving = True
            self._serve(job)
            self._serving = False

    def _serve(self, job: _Job) -> None:
        if self._closing.is_set():  # queued when close() came: it hears why it will not run
            job.send(ServerShuttingDown(SHUTTING_DOWN))
            job.send(None)
            return
        if job.cancelled():
            job.send(None)
            return
        end: Item = None
        try:
            for event in job.work(lambda: job.cancelled() or self._closing.is_set()):
                if self._closing.is_set():  # not its own end: the turn was cut short, and hears why
                    end = ServerShuttingDown(SHUTTING_DOWN)
                    break
                if not job.send([event]):
                    break  # dropping the generator stops the turn; a failed sink hears nothing more (send)
                # a cancelled turn is ended by its work at the next token, with Done("cancelled") as in batching
        except BaseException as exc:  # handed to the waiting request, which re-raises it
            end = exc
        if end is not None:
            job.send(end)
        job.send(None)

    def waiting(self) -> int:
        """Turns queued behind the one being generated."""
        return self._jobs.qsize()

    def running(self) -> int:
        """1 while a turn is being generated."""
        return int(self._serving)

    def kv_used(self) -> int | None:
        """None: one sequence, no shared cache to count."""
        return None

    def close(self) -> None:
        """End the running turn (at its next token) and every queued one with ServerShuttingDown, and return
        once the thread has exited: never with a timeout that leaves it running beside a later runner."""
        with self._lock:
            self._closing.set()
            self._jobs.put(None)
        self._thread.join()
