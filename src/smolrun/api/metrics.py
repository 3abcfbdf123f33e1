"""Prometheus metrics (`GET /metrics`) and one log line per generation request, taken as each response ends."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smolrun.api.state import AppState
from smolrun.backends.vllm import VllmModel
from smolrun.scheduler import EventStream
from smolrun.turn import Done, Event

log = logging.getLogger("smolrun.requests")
# The POST routes that get a log line.
GENERATION = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
# The route label of requests no route took (an unknown path; one refused before routing: a foreign Host, an
# oversized body): their raw paths would make the labels unbounded.
UNMATCHED = "unmatched"
_RECORD = "smolrun.record"  # where a request's record sits in its ASGI scope, for the route to fill in
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
EXEC_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class Record:
    """One request as it runs: the middleware fills in its route and status, a generation route its id, model
    and finish reason, and the events of its model turns (`watch`) their tokens and times."""

    method: str
    route: str = UNMATCHED  # the path template of the route that took it
    started: float = field(default_factory=time.perf_counter)
    status: int = 500  # what the server answers when the app raised before answering
    id: str = "-"
    model: str = "-"
    finish: str = "-"  # as the client saw it: Chat's finish_reason, the Responses status
    turns: int = 0  # model turns that ended (a Responses request may take several)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    decode_s: float = 0.0
    gaps: int = 0  # tokens after each turn's first: the intervals decode_s spans
    first_token: float | None = None
    ended: bool = False

    @property
    def generation(self) -> bool:
        return self.method == "POST" and self.route in GENERATION

    def watch(self, events: EventStream) -> Watched:
        return Watched(events, self)

    def saw(self, event: Event) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
        if isinstance(event, Done):
            stats = event.stats
            self.turns += 1
            self.prompt_tokens += stats.prompt_tokens
            self.cached_tokens += stats.cached_tokens
            self.completion_tokens += stats.completion_tokens
            self.decode_s += stats.decode_s
            self.gaps += max(stats.completion_tokens - 1, 0)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def tokens_per_s(self) -> float | None:
        return self.completion_tokens / self.decode_s if self.decode_s > 0 else None

    def line(self) -> str:
        ttft, speed = self.ttft_s, self.tokens_per_s
        return (f"id={self.id} route={self.route} model={self.model} prompt_tokens={self.prompt_tokens} "
                f"cached_tokens={self.cached_tokens} completion_tokens={self.completion_tokens} "
                f"ttft_s={'-' if ttft is None else f'{ttft:.3f}'} tok_s={'-' if speed is None else f'{speed:.1f}'} "
                f"finish={self.finish} status={self.status}")


class Watched:
    """A model turn's events, seen by the request's record on their way to the route."""

    def __init__(self, events: EventStream, record: Record) -> None:
        self.events = events
        self.record = record

    def __aiter__(self) -> Watched:
        return self

    async def __anext__(self) -> Event:
        event = await self.events.__anext__()
        self.record.saw(event)
        return event

    async def aclose(self) -> None:
        await self.events.aclose()


def record_of(request: Request) -> Record:
    """The record of a generation request, for its route to fill in (a detached one outside the middleware)."""
    found = request.scope.get(_RECORD)
    return found if isinstance(found, Record) else Record(request.method, request.url.path)


class Metrics:
    """The counters and histograms, in a registry of their own (not the process-wide default, so that apps in
    one process do not clash); the app adds its `LiveGauges`. The served `models` start at zero, so that a rate
    over a counter sees its first increase."""

    def __init__(self, models: tuple[str, ...] = ()) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("smolrun_requests", "HTTP requests answered, by method, route and status",
                                ["method", "route", "status"], registry=registry)
        tokens = "of generation requests, summed over their model turns"
        self.prompt_tokens = Counter("smolrun_prompt_tokens", f"Prompt tokens {tokens}", ["model"], registry=registry)
        self.cached_tokens = Counter("smolrun_cached_tokens", f"Prompt tokens the KV cache already held (prefix "
                                     f"reuse), {tokens}", ["model"], registry=registry)
        self.completion_tokens = Counter("smolrun_completion_tokens", f"Completion tokens {tokens}", ["model"],
                                         registry=registry)
        self.cache_hits = Counter("smolrun_prefix_cache_hits", "Generation requests whose prompt the KV cache "
                                  "partly held", ["model"], registry=registry)
        self.ttft = Histogram("smolrun_time_to_first_token_seconds", "From a request's arrival to its first "
                              "generated token", ["model"], buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("smolrun_inter_token_latency_seconds", "A request's mean time between generated tokens "
                             "(decoding time over the tokens after each turn's first)", ["model"],
                             buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("smolrun_e2e_request_latency_seconds", "From a generation request's arrival to the "
                             "last byte of its response", ["model"], buckets=E2E_BUCKETS, registry=registry)
        self.exec = Histogram("smolrun_sandbox_exec_seconds", "Time a code cell ran in a sandbox",
                              buckets=EXEC_BUCKETS, registry=registry)
        for model in models:
            for metric in (self.prompt_tokens, self.cached_tokens, self.completion_tokens, self.cache_hits,
                           self.ttft, self.itl, self.e2e):
                metric.labels(model)

    def end(self, record: Record) -> None:
        """Count a request once, as its response ends; log a generation request's line."""
        if record.ended:
            return
        record.ended = True
        self.requests.labels(record.method, record.route, str(record.status)).inc()
        if not record.generation:
            return
        log.info("%s", record.line())
        if record.turns == 0:  # refused or cut short before any model turn ended: nothing was generated
            return
        model = record.model
        self.prompt_tokens.labels(model).inc(record.prompt_tokens)
        self.cached_tokens.labels(model).inc(record.cached_tokens)
        self.completion_tokens.labels(model).inc(record.completion_tokens)
        if record.cached_tokens > 0:
            self.cache_hits.labels(model).inc()
        if (ttft := record.ttft_s) is not None:
            self.ttft.labels(model).observe(ttft)
        if record.gaps > 0:
            self.itl.labels(model).observe(record.decode_s / record.gaps)
        self.e2e.labels(model).observe(time.perf_counter() - record.started)


class LiveGauges:
    """Gauges read from the engines and the sandboxes when scraped, never polled."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        waiting = GaugeMetricFamily("smolrun_queue_depth", "Turns waiting for the model (not yet decoding)",
                                    labels=["model"])
        running = GaugeMetricFamily("smolrun_running_sequences", "Turns being decoded", labels=["model"])
        used = GaugeMetricFamily("smolrun_kv_cells_used", "KV cache cells in use (shared prefixes once), on "
                                 "models that batch", labels=["model"])
        free = GaugeMetricFamily("smolrun_kv_cells_free", "KV cache cells free, on models that batch",
                                 labels=["model"])
        replicas = GaugeMetricFamily("smolrun_vllm_replicas_up", "vLLM servers not left out after a failure",
                                     labels=["model"])
        for engine in self.state.models.loaded():
            waiting.add_metric([engine.name], engine.waiting())
            running.add_metric([engine.name], engine.running())
            if (cells := engine.kv_cells()) is not None:
                used.add_metric([engine.name], cells[0])
                free.add_metric([engine.name], cells[1] - cells[0])
            if isinstance(engine.model, VllmModel):
                replicas.add_metric([engine.name], engine.model.replicas.up())
        loaded = GaugeMetricFamily("smolrun_model_loaded", "1 for a model in memory, 0 for one loaded on demand",
                                   labels=["model"])
        for model in self.state.models.models:
            loaded.add_metric([model.name], int(model.engine is not None))
        containers = self.state.containers
        yield from (waiting, running, used, free, replicas, loaded)
        yield GaugeMetricFamily("smolrun_sandbox_containers_active", "Sandbox containers running",
                                value=containers.active())
        yield GaugeMetricFamily("smolrun_sandbox_containers_warm", "Sandbox containers started ahead, ready",
                                value=containers.warm())


class MetricsMiddleware:
    """Gives each request its record and ends it as its response's last byte goes out (so that a client that
    has the whole response already finds it counted), or when the app returns without one."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        entry = Record(scope["method"])
        scope[_RECORD] = entry

        def end() -> None:
            # FastAPI names the route that took the request in its scope (one that lacks the method too).
            entry.route = str(getattr(scope.get("route"), "path", UNMATCHED))
            self.metrics.end(entry)

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                end()
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            end()
