"""The models a server answers with: those loaded at start, and with `--models` more loaded on demand.

A request takes a lease on the model it names (`acquire`) for as long as it runs, its stream included. A model
not in memory is loaded on the first request for it, off the event loop; requests for a model that is loading
wait for that one load. Past `--max-loaded-models` (or `--max-loaded-gb`), the least recently used model that no
request holds is unloaded first; when every loaded model is in use, the load waits until one is free, so that
nothing already accepted is cut. At most `max_waiting` requests wait for loads (then QueueFull, a 429).

All state changes on the event loop's thread; loads and unloads run on worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from smolrun.config import Settings
from smolrun.engine import Engine
from smolrun.errors import InvalidRequest, ModelNotFound, QueueFull
from smolrun.models import list_models, resolve

AUTO = "auto"  # the model alias that routes by content: a model that sees for pictures, else the default model
log = logging.getLogger("smolrun")
Release = Callable[[], None]


@dataclass(eq=False)
class Servable:
    """One model the server can answer with, loaded or not."""

    name: str  # /v1/models' id
    source: str  # what loads it (a registry name, a path, owner/repo:file.gguf); requests may name it so too
    mmproj: str | None = None  # its vision projector, where given apart
    sees: bool | None = None  # None: not known until it is loaded
    thinks: bool | None = None
    engine: Engine | None = None
    users: int = 0  # requests holding a lease on it
    used: float = field(default_factory=time.monotonic)  # the last lease taken on it
    memory: int | None = None  # bytes (weights and KV cache) when last loaded; until then its files' size
    loading: asyncio.Future[Engine] | None = None
    placed: bool = False  # its load has made room and counts as loaded

    def answers_to(self, requested: str) -> bool:
        return requested in {self.name, self.source} or (self.engine is not None and requested == self.engine.name)

    def hold(self, engine: Engine) -> None:
        self.engine, self.sees = engine, engine.sees
        self.thinks = engine.profile.thinking is not None
        self.memory = getattr(engine.model, "memory_bytes", None) or self.memory  # else the estimate stays


class ModelPool:
    def __init__(self, models: Sequence[Servable], load: Callable[[Servable], Engine], *, default: Servable,
                 vision: Servable | None = None, max_loaded: int = 3, max_bytes: int | None = None,
                 max_waiting: int = 16) -> None:
        if max_loaded < 1:
            raise InvalidRequest("--max-loaded-models must be at least 1", param="max_loaded_models")
        self.models = list(models)
        self.default = default  # answers `auto` without pictures
        self.vision = vision  # answers `auto` with pictures, before any other model that sees
        self.max_loaded = max_loaded
        self.max_bytes = max_bytes
        self.max_waiting = max_waiting
        self.loads = 0  # loads done on demand (those at start not counted)
        self.unloads = 0
        self._load = load
        self._waiting = 0  # requests waiting for a load
        self._room: asyncio.Lock | None = None  # one load makes room at a time (made on the event loop)
        self._changed: asyncio.Event | None = None  # set when a lease ends or a load ends

    @classmethod
    def serving(cls, settings: Settings, engine: Engine, vision: Engine | None = None) -> ModelPool:
        """The pool of a server started with `engine` (from settings.model) and `vision` (settings.vision_model)
        loaded, and settings.models available on demand, each found on this machine now (a one-line error for
        one that is not: `smolrun pull` it first). On-demand loading serves GGUF models on llama.cpp."""
        if settings.models and settings.backend != "llama":
            raise InvalidRequest("--models (models loaded on demand) serves GGUF models on llama.cpp; on "
                                 f"{settings.backend} run one server per model", param="models")
        text = Servable(engine.name, settings.model, None if settings.vision_model else settings.mmproj)
        text.hold(engine)
        models = [text]
        seeing = None
        if vision is not None:
            seeing = Servable(vision.name, settings.vision_model or vision.name, settings.mmproj)
            seeing.hold(vision)
            models.append(seeing)
        for name in on_demand(settings.models):
            if any(m.answers_to(name) for m in models):
                continue
            found = resolve(name, offline=True)
            if any(m.answers_to(found.name) for m in models):
                continue
            size = sum(p.stat().st_size for p in (found.path, found.mmproj) if p is not None)
            models.append(Servable(found.name, name, sees=found.mmproj is not None, memory=size))

        def load(model: Servable) -> Engine:
            return Engine.load(settings, model.source, model.mmproj)

        max_bytes = None if settings.max_loaded_gb is None else int(settings.max_loaded_gb * 2**30)
        return cls(models, load, default=text, vision=seeing, max_loaded=settings.max_loaded_models,
                   max_bytes=max_bytes, max_waiting=settings.max_queue)

    def loaded(self) -> list[Engine]:
        return [m.engine for m in self.models if m.engine is not None]

    def find(self, requested: str) -> Servable:
        """The model a request names (its name, or what it was loaded from); `auto` is the default model."""
        if requested == AUTO:
            return self.default
        for model in self.models:
            if model.answers_to(requested):
                return model
        names = ", ".join(f"'{m.name}'" for m in self.models)
        raise ModelNotFound(f"The model '{requested}' does not exist on this server; it serves {names} (and '{AUTO}', "
                            f"which picks by content); start it with --models {requested} to serve that one too",
                            param="model")

    def pick(self, requested: str, pictures: bool) -> Servable:
        """The model that answers: the named one, or for `auto` with pictures the vision model, else a loaded model
        that sees, else one that sees. Pictures for a model known to be blind are a 400 naming those that see."""
        model = self.find(requested)
        if requested == AUTO and pictures:
            seeing = [m for m in self.models if m.sees]
            if self.vision is not None:
                seeing.insert(0, self.vision)
            model = next((m for m in seeing if m.engine is not None), seeing[0] if seeing else model)
        if pictures and model.sees is False:
            self._refuse_pictures(model)
        return model

    def _refuse_pictures(self, model: Servable) -> None:
        seeing = [m.name for m in self.models if m.sees]
        where = (f"models on this server that can: {', '.join(repr(n) for n in seeing)} (or '{AUTO}')"
                 if seeing else "no model on this server can; start it with --vision-model smolvlm2-2.2b")
        raise InvalidRequest(f"The model '{model.name}' cannot see images; {where}", param="model")

    async def acquire(self, requested: str, pictures: bool = False) -> tuple[Engine, Release]:
        """The engine of the model that answers, loaded, and the release of the lease on it (call it once, when
        the request is over). Raises what `pick` raises, QueueFull when too many wait for loads, and the load's
        own error (ModelUnavailable ...) when the model cannot load."""
        model = self.pick(requested, pictures)
        model.users += 1
        model.used = time.monotonic()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                model.users -= 1
                self._notify()

        try:
            engine = model.engine if model.engine is not None else await self._wait_for(model)
            if pictures and not engine.sees:
                self._refuse_pictures(model)
        except BaseException:
            release()
            raise
        return engine, release

    async def _wait_for(self, model: Servable) -> Engine:
        if self._waiting >= self.max_waiting:
            raise QueueFull("the server is busy: too many requests wait for models to load; retry shortly")
        self._waiting += 1
        try:
            while model.engine is None:
                if model.loading is None:
                    model.loading = asyncio.ensure_future(self._bring_in(model))
                    model.loading.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning
                # A waiter that leaves does not cancel the load the others wait for.
                await asyncio.shield(model.loading)
            return model.engine
        finally:
            self._waiting -= 1

    async def _bring_in(self, model: Servable) -> Engine:
        if self._room is None:
            self._room = asyncio.Lock()
        try:
            async with self._room:  # in turn: two loads that each wait for the other's room would wait for ever
                await self._make_room(model)
                model.placed = True
            log.info("loading %s on demand", model.name)
            started = time.perf_counter()
            engine = await asyncio.to_thread(self._load, model)
            model.hold(engine)
            self.loads += 1
            log.info("loaded %s in %.1f s", model.name, time.perf_counter() - started)
            return engine
        finally:
            model.loading, model.placed = None, False
            self._notify()

    async def _make_room(self, model: Servable) -> None:
        """Unload idle models, least recently used first, until `model` fits beside those left (and the one
        loading, if any); wait while it does not fit and every loaded model is in use."""
        while not self._fits(model):
            idle = [m for m in self.models if m.engine is not None and m.users == 0]
            if not idle:
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()
                continue
            victim = min(idle, key=lambda m: m.used)
            engine, victim.engine = victim.engine, None  # no new lease finds it from here on
            assert engine is not None
            log.info("unloading %s (least recently used) to load %s", victim.name, model.name)
            await asyncio.to_thread(engine.shutdown)
            self.unloads += 1

    def _fits(self, model: Servable) -> bool:
        others = [m for m in self.models if m is not model and (m.engine is not None or m.placed)]
        if not others:
            return True  # alone, a model loads whatever the memory limit says
        if len(others) >= self.max_loaded:
            return False
        if self.max_bytes is None:
            return True
        return sum(m.memory or 0 for m in others) + (model.memory or 0) <= self.max_bytes

    def _notify(self) -> None:
        """Wake the load waiting for room (leases and loads end on the event loop's thread)."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def close(self) -> None:
        """End every loaded model's live and queued turns (503s); a later turn starts a new runner."""
        for engine in self.loaded():
            engine.close()

    def shutdown(self) -> None:
        for engine in self.loaded():
            engine.shutdown()


def on_demand(names: Sequence[str]) -> list[str]:
    """`--models` as given, `all` standing for every model on this machine (bundled, cached or pulled)."""
    found: list[str] = []
    for name in names:
        if name == "all":
            found += [e.name for e in list_models() if e.status in ("bundled", "cached", "pulled")]
        else:
            found.append(name)
    return list(dict.fromkeys(found))
