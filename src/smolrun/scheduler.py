"""How a turn waits for its model: admitted at once (or QueueFull, a 429), then its events stream back to asyncio.

Two runners sit behind the engine seam: `Scheduler` (a thread running one turn at a time, for models with one
sequence) and `backends.batch.BatchEngine` (continuous batching). Both hand events over as an `EventStream`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from smolrun.errors import QueueFull
from smolrun.turn import Event

Item = list[Event] | BaseException | None  # what a runner sends: events, an error, or None at the end
Sink = Callable[[Item], None]
Work = Callable[[Callable[[], bool]], Iterator[Event]]  # given "is it cancelled?", yields events


class EventStream:
    """The events of one admitted turn, as an async iterator. Leaving early (an exception, a cancelled task,
    `aclose`, or dropping it) cancels the turn, which its runner notices at the next token."""

    def __init__(self, transform: Callable[[Event], list[Event]] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.cancelled = threading.Event()
        self._items: asyncio.Queue[Item] = asyncio.Queue()
        self._ready: deque[Event] = deque()
        self._transform = transform
        self._ended = False

    def sink(self, item: Item) -> None:
        """Called from the runner's thread."""
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
                    for event in item:
                        self._ready.extend(self._transform(event) if self._transform else (event,))
        except BaseException:
            self.cancelled.set()
            raise
        return self._ready.popleft()

    async def aclose(self) -> None:
        self.cancelled.set()

    def __del__(self) -> None:
        self.cancelled.set()


@dataclass
class _Job:
    work: Work
    sink: Sink
    cancelled: Callable[[], bool]


@dataclass
class Scheduler:
    """Runs turns one at a time, in arrival order, on one thread that owns the model."""

    max_queue: int
    _jobs: queue.Queue[_Job | None] = field(init=False)
    _thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self._jobs = queue.Queue()  # bounded by submit, so that a continuing turn is never refused
        self._thread = threading.Thread(target=self._run, name="smolrun-model", daemon=True)
        self._thread.start()

    def submit(self, work: Work, sink: Sink, cancelled: Callable[[], bool], bounded: bool = True) -> None:
        """`bounded`: refused (QueueFull) when max_queue turns wait; a later turn of an admitted response is not."""
        if bounded and self._jobs.qsize() >= self.max_queue:
            raise QueueFull("the model is busy: too many requests are waiting; retry shortly")
        self._jobs.put_nowait(_Job(work, sink, cancelled))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled():
                job.sink(None)
                continue
            try:
                for event in job.work(job.cancelled):
                    job.sink([event])
                    if job.cancelled():
                        break
            except BaseException as exc:  # handed to the waiting request, which re-raises it
                job.sink(exc)
            job.sink(None)

    def waiting(self) -> int:
        """Turns queued behind the one being generated."""
        return self._jobs.qsize()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)
