"""A warm pool: containers started ahead of time with the data stack imported, handed out at once."""

from __future__ import annotations

import threading
from collections import deque

from smolrun.sandbox.container import Container
from smolrun.sandbox.launch import SandboxConfig


class WarmPool:
    def __init__(self, config: SandboxConfig, size: int = 1) -> None:
        self.config = config
        self.size = size
        self._ready: deque[Container] = deque()
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._refill, name="smolrun-warm-pool", daemon=True)
        self._thread.start()
        self._wanted.set()

    def acquire(self) -> Container:
        """A started container: from the pool when one is ready, else started now (cold)."""
        with self._lock:
            container = self._ready.popleft() if self._ready else None
        self._wanted.set()
        return container if container is not None else Container(self.config).start()

    def ready(self) -> int:
        with self._lock:
            return len(self._ready)

    def _refill(self) -> None:
        while self._wanted.wait() and not self._closed:
            self._wanted.clear()
            while not self._closed and self.ready() < self.size:
                try:
                    container = Container(self.config).start()
                except Exception:  # the sandbox is unavailable: acquire() reports why
                    break
                with self._lock:
                    if self._closed:
                        container.close()
                        return
                    self._ready.append(container)

    def close(self) -> None:
        self._closed = True
        self._wanted.set()
        with self._lock:
            ready, self._ready = list(self._ready), deque()
        for container in ready:
            container.close()
