"""One worker thread owns the model; requests wait in a bounded queue and stream events back to asyncio."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from smolrun.errors import QueueFull

Work = Callable[[Callable[[], bool]], Iterator[Any]]  # given "is it cancelled?", yields events
_END = object()


@dataclass
class _Job:
    work: Work
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Any]
    cancel: threading.Event = field(default_factory=threading.Event)

    def send(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Scheduler:
    """Runs jobs one at a time, in arrival order, off the event loop.

    A full queue raises QueueFull (429) at submission; a consumer that stops listening (client gone)
    cancels its job, which the decode loop notices at its next token.
    """

    def __init__(self, max_queue: int) -> None:
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="smolrun-model", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancel.is_set():
                continue
            try:
                for item in job.work(job.cancel.is_set):
                    job.send(item)
                    if job.cancel.is_set():
                        break
            except BaseException as exc:  # handed to the waiting request, which re-raises it
                job.send(exc)
            job.send(_END)

    async def stream(self, work: Work) -> AsyncIterator[Any]:
        job = _Job(work, asyncio.get_running_loop(), asyncio.Queue())
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull("the model is busy: too many requests are waiting; retry shortly") from None
        try:
            while (item := await job.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancel.set()

    def waiting(self) -> int:
        """Requests queued behind the one being generated."""
        return self._jobs.qsize()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)
