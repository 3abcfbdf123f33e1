"""Containers as an API resource: metadata in the store, live sandboxes in memory, idle expiry, files."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

from smolrun.container_store import ContainerStore, Order
from smolrun.errors import InvalidRequest, NotFound
from smolrun.files import FileStore
from smolrun.sandbox import files
from smolrun.sandbox.container import OWNER_STORE, Container, Execution, release_directory, sweep_orphans
from smolrun.sandbox.launch import SandboxConfig
from smolrun.sandbox.pool import WarmPool
from smolrun.store import Store

T = TypeVar("T")
SANDBOX_THREADS = 32
MEMORY_LIMITS = {"1g": 1024, "4g": 4096, "16g": 16384, "64g": 65536}
DEFAULT_MEMORY = "1g"


class ContainerManager:
    def __init__(self, store: Store, config: SandboxConfig, file_store: FileStore, warm: int = 1) -> None:
        self.store = store
        self.records = ContainerStore(store)
        self.config = config
        self.file_store = file_store
        self._live: dict[str, Container] = {}
        self._lock = threading.Lock()
        # Sandbox work runs on threads of its own, never on the event loop's default pool, so whatever code in
        # a sandbox does can hold only these; one call at a time per container holds even one of them.
        self._executor = ThreadPoolExecutor(SANDBOX_THREADS, thread_name_prefix="smolrun-sandbox")
        self._running: dict[str, asyncio.Lock] = {}
        self._resuming = threading.Lock()
        kept = self._adopt_leftovers()
        sweep_orphans(config.root, kept, store.path)
        self._pool: WarmPool | None = WarmPool(config, size=warm) if warm > 0 else None
        self.on_exec: Callable[[Execution], None] = lambda result: None  # each cell that ran (for metrics)
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="smolrun-container-reaper", daemon=True)
        self._reaper.start()

    # -- from the event loop ------------------------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking container work (start, files, delete) on the sandbox threads."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args))

    async def run_code(self, container_id: str, code: str,
                       timeout: float | None) -> tuple[Execution, dict[str, dict[str, Any]]]:
        """`execute` from the event loop: calls to one container wait here, on the loop, not on a thread.

        A caller that goes away (a client disconnect) releases the turn only when its call has ended, so
        calls to a busy container never pile up on threads.
        """
        turn = self._running.setdefault(container_id, asyncio.Lock())
        await turn.acquire()
        future = asyncio.get_running_loop().run_in_executor(self._executor, self.execute, container_id, code,
                                                              timeout)
        future.add_done_callback(lambda _: turn.release())
        return await asyncio.shield(future)

    # -- containers ---------------------------------------------------------------------------------------

    def create(self, name: str, expires_minutes: int = 20, memory_limit: str = DEFAULT_MEMORY,
               file_ids: tuple[str, ...] = ()) -> dict[str, Any]:
        if memory_limit not in MEMORY_LIMITS:
            raise InvalidRequest(f"'memory_limit' must be one of {', '.join(MEMORY_LIMITS)}", param="memory_limit")
        if not 1 <= expires_minutes <= 24 * 60:
            raise InvalidRequest("'expires_after.minutes' must be between 1 and 1440", param="expires_after")
        uploads = [self.file_store.content(f) for f in file_ids]  # 404 before anything starts
        if memory_limit == DEFAULT_MEMORY and self._pool is not None:
            container = self._pool.acquire()
        else:
            container = Container(self._config(memory_limit)).start()
        now = int(time.time())
        self.records.add(container.id, name, now, expires_minutes, memory_limit)
        (self.config.root / container.id / OWNER_STORE).write_text(str(self.store.path))  # ours to resume
        with self._lock:
            self._live[container.id] = container
        for meta, data in uploads:
            self.add_file(container.id, meta["filename"], data, source="user")
        return self.get(container.id)

    def get(self, container_id: str) -> dict[str, Any]:
        row = self.records.get(container_id)
        if row is None:
            raise NotFound(f"No container found with id '{container_id}'.", param="container_id")
        return {
            "id": row["id"], "object": "container", "name": row["name"], "created_at": row["created_at"],
            "status": row["status"], "last_active_at": row["last_active_at"], "memory_limit": row["memory_limit"],
            "expires_after": {"anchor": "last_active_at", "minutes": row["expires_minutes"]},
        }

    def list_all(self, order: Order, name: str | None) -> list[dict[str, Any]]:
        return [self.get(container_id) for container_id in self.records.ids(order, name)]

    def live(self, container_id: str) -> Container:
        """The running container; any use refreshes its expiry, as at OpenAI."""
        meta = self.get(container_id)
        if meta["status"] == "expired":
            raise _expired(container_id)
        with self._lock:
            container = self._live.get(container_id)
        if container is None:  # kept across a restart: started again over its files, at first use
            container = self._resume(container_id, meta["memory_limit"])
        self.records.touch(container_id, int(time.time()))
        return container

    def _config(self, memory_limit: str) -> SandboxConfig:
        return replace(self.config, limits=replace(self.config.limits, memory_mb=MEMORY_LIMITS[memory_limit]))

    def _resume(self, container_id: str, memory_limit: str) -> Container:
        with self._resuming:
            with self._lock:
                running = self._live.get(container_id)
            if running is not None:  # another call resumed it meanwhile
                return running
            if not (self.config.root / container_id / "data").is_dir():  # its files are gone: so is the container
                self.records.end(container_id, "expired")
                raise _expired(container_id)
            container = Container(self._config(memory_limit), id=container_id).start(resume=True)
            with self._lock:
                self._live[container_id] = container
            return container

    def delete(self, container_id: str) -> dict[str, Any]:
        self.get(container_id)
        self._stop(container_id)
        self.records.end(container_id, "deleted")
        return {"id": container_id, "object": "container.deleted", "deleted": True}

    def execute(self, container_id: str, code: str,
                timeout: float | None) -> tuple[Execution, dict[str, dict[str, Any]]]:
        """Run a cell; also the container files it created or changed, registered (path -> file object)."""
        container = self.live(container_id)
        result = container.run(code, timeout)
        self.on_exec(result)
        self.records.touch(container_id, int(time.time()))
        self.sync_files(container_id)
        written: dict[str, dict[str, Any]] = {}
        for rel in result.files:
            file_id = self.records.file_id(container_id, f"/mnt/data/{rel}")
            if file_id is not None:  # None: deleted again before the walk (a file the code removed at once)
                written[f"/mnt/data/{rel}"] = self.file(container_id, file_id)
        return result, written

    def active(self) -> int:
        """Containers running now (those kept across a restart start again at their first use)."""
        with self._lock:
            return len(self._live)

    def warm(self) -> int:
        """Started containers waiting in the warm pool."""
        return 0 if self._pool is None else self._pool.ready()

    def _stop(self, container_id: str) -> None:
        with self._lock:
            container = self._live.pop(container_id, None)
        self._running.pop(container_id, None)
        if container is not None:
            container.close()
        else:  # kept from before a restart and not resumed: only its files are left
            release_directory(self.config.root / container_id)


    def _adopt_leftovers(self) -> frozenset[str]:
        """Containers still 'active' in the store were kept by a previous process (see close): those within
        their `expires_after`, counted across the restart, are resumed at first use; the others expire."""
        now, kept = time.time(), set()
        for row in self.records.active():
            if now - row["last_active_at"] <= row["expires_minutes"] * 60:
                kept.add(row["id"])
                continue
            release_directory(self.config.root / row["id"])
            self.records.end(row["id"], "expired")
        return frozenset(kept)

    def _reap_loop(self) -> None:
        while not self._closed.wait(15):
            self.reap()

    def reap(self, now: float | None = None) -> list[str]:
        """Expire containers unused for longer than their `expires_after`: files and memory are discarded."""
        now = time.time() if now is None else now
        expired = [r["id"] for r in self.records.active() if now - r["last_active_at"] > r["expires_minutes"] * 60]
        for container_id in expired:
            self._stop(container_id)
            self.records.end(container_id, "expired")
        return expired

    def close(self) -> None:
        self._closed.set()
        if self._pool is not None:
            self._pool.close()
        with self._lock:
            live, self._live = list(self._live.values()), {}
        for container in live:  # their files stay, for the next process to resume
            container.close(keep_files=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- container files ----------------------------------------------------------------------------------

    def add_file(self, container_id: str, name: str, data: bytes, source: str = "user") -> dict[str, Any]:
        container = self.live(container_id)
        path = container.put_file(name, data)
        return self._record(container_id, path, len(data), source)

    def _record(self, container_id: str, path: str, size: int, source: str) -> dict[str, Any]:
        file_id = self.records.file_id(container_id, path)
        if file_id is None:
            file_id = f"cfile_{uuid.uuid4().hex}"
            self.records.add_file(file_id, container_id, path, size, int(time.time()), source)
        else:
            self.records.resize_file(file_id, size)
        return self.file(container_id, file_id)

    def sync_files(self, container_id: str) -> None:
        """Register files the code created (source "assistant") and forget files that are gone."""
        container = self.live(container_id)
        walked = files.listing(container.workdir, self.config.limits.work_files + 1)
        present = {f"/mnt/data/{p}": size for p, (size, _) in walked.files.items()}
        known = self.records.paths(container_id)
        for path, size in present.items():
            if path in known:
                self.records.resize_file(known[path], size)
            else:
                self._record(container_id, path, size, "assistant")
        for path, file_id in known.items():
            if path not in present and walked.complete:  # a walk cut short proves nothing gone
                self.records.drop_file(file_id)

    def list_files(self, container_id: str, order: Order) -> list[dict[str, Any]]:
        self.sync_files(container_id)
        return [self.file(container_id, file_id) for file_id in self.records.file_ids(container_id, order)]

    def file(self, container_id: str, file_id: str) -> dict[str, Any]:
        row = self.records.file(container_id, file_id)
        if row is None:
            raise NotFound(f"No file found with id '{file_id}' in container '{container_id}'.", param="file_id")
        return {"object": "container.file", **row}

    def file_content(self, container_id: str, file_id: str, max_bytes: int) -> tuple[dict[str, Any], bytes]:
        container = self.live(container_id)
        meta = self.file(container_id, file_id)
        return meta, container.read_file(meta["path"].removeprefix("/mnt/data/"), max_bytes)

    def delete_file(self, container_id: str, file_id: str) -> dict[str, Any]:
        container = self.live(container_id)
        meta = self.file(container_id, file_id)
        files.remove_file(container.workdir, meta["path"].removeprefix("/mnt/data/"))
        self.records.drop_file(file_id)
        return {"id": file_id, "object": "container.file.deleted", "deleted": True}


def _expired(container_id: str) -> InvalidRequest:
    return InvalidRequest(f"Container is expired: {container_id}", param="container_id", code="container_expired")
