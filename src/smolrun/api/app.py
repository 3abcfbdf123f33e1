"""The FastAPI application: routes, API-key check, and every error in OpenAI's shape."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smolrun import __version__
from smolrun.api.browser import BrowserGuard, BrowserPolicy
from smolrun.api.chat import router as chat_router
from smolrun.api.completions import router as completions_router
from smolrun.api.containers import router as containers_router
from smolrun.api.files import router as files_router
from smolrun.api.metrics import LiveGauges, Metrics, MetricsMiddleware
from smolrun.api.playground import router as playground_router
from smolrun.api.responses import router as responses_router
from smolrun.api.state import AppState, Leases, get_state
from smolrun.api.wire import wire_param
from smolrun.config import Settings
from smolrun.errors import AuthenticationFailed, InvalidRequest, NotFound, PayloadTooLarge, SmolrunError, client_error
from smolrun.files import FileStore
from smolrun.pool import ModelPool, Servable
from smolrun.responses_store import ResponseStore
from smolrun.sandbox import default_config
from smolrun.sandbox.manager import ContainerManager
from smolrun.store import Store

log = logging.getLogger("smolrun")


class _BodyLimit:
    """JSON bodies (the generation routes) larger than `limit` are a 413 before they are parsed; uploads have
    their own limit (--max-file-mb). A JSON body is read whole here, as its route would read it anyway."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or ()) if scope["type"] == "http" else {}
        if not headers.get(b"content-type", b"").startswith(b"application/json"):
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            more = message.get("more_body", False)
        body: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLarge(f"the request body is larger than {self.limit // (1024 * 1024)} MiB "
                                "(--max-body-mb)", code="request_too_large")
        await JSONResponse(error.to_dict(), status_code=413)(scope, receive, send)


class _UnexpectedErrors:
    """A bug's exception as a 500 in OpenAI's shape, answered like any response. Starlette's own handler for
    `Exception` answers, then re-raises, and the server drops the keep-alive connection, so the client's next
    request on it would fail."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:
            if started:  # a stream already under way: nothing can be answered any more
                raise
            error = client_error(exc, f"on {scope.get('path')}")
            await JSONResponse(error.to_dict(), status_code=error.status)(scope, receive, send)


def create_app(models: ModelPool, settings: Settings) -> FastAPI:
    """The server for the pool's models (each loaded one with its own queue)."""
    store = Store(settings.data_dir / "smolrun.db")
    file_store = FileStore(store, settings.data_dir / "files")
    containers = ContainerManager(store, default_config(), file_store, warm=settings.warm_containers)
    state = AppState(settings, models, file_store, containers, ResponseStore(store))
    for served in models.loaded():
        served.max_queue = settings.max_queue  # before its first turn starts the runner
        served.stream_interval = settings.stream_interval_ms / 1000
    created = int(time.time())
    metrics = Metrics(tuple(m.name for m in models.models))
    metrics.registry.register(LiveGauges(state))
    containers.on_exec = lambda result: metrics.exec.observe(result.duration_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        models.close()
        containers.close()
        store.close()

    # Under --api-key the API description is not served: it would be the one route open without the key.
    open_docs = not settings.api_key
    app = FastAPI(title="smolrun", version=__version__, lifespan=lifespan, docs_url="/docs" if open_docs else None,
                  redoc_url="/redoc" if open_docs else None, openapi_url="/openapi.json" if open_docs else None)
    app.state.smolrun = state

    async def check_api_key(request: Request) -> None:
        key = settings.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise AuthenticationFailed(
                "Incorrect API key provided." if token else "Missing API key: send 'Authorization: Bearer <key>'."
            )

    @app.exception_handler(SmolrunError)
    async def smolrun_error(request: Request, exc: SmolrunError) -> JSONResponse:
        if exc.status >= 500:
            log.error("%s: %s", type(exc).__name__, exc.message)
        return JSONResponse(exc.to_dict(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = wire_param(first.get("loc", ()))
        message = f"Invalid request: {first.get('msg', 'malformed body')}" + (f" at '{param}'" if param else "")
        return JSONResponse(InvalidRequest(message, param=param).to_dict(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error: SmolrunError
        if exc.status_code == 404:
            error = NotFound(f"Unknown request URL: {request.method} {request.url.path}")
        elif exc.status_code < 500:
            error = InvalidRequest(str(exc.detail))
            error.status = exc.status_code
        else:
            error = SmolrunError(str(exc.detail))
        return JSONResponse(error.to_dict(), status_code=exc.status_code)

    app.add_middleware(Leases)
    app.add_middleware(_BodyLimit, limit=settings.max_body_mb * 1024 * 1024)
    app.add_middleware(_UnexpectedErrors)  # outside the limit: an oversized body is the limit's to answer
    # Outside the limit: a foreign Host or Origin is refused before any body is read.
    app.add_middleware(BrowserGuard, policy=BrowserPolicy.build(settings.host, settings.allowed_hosts,
                                                                settings.allowed_origins))
    # The outermost: refusals (403, 413) and bugs' 500s are counted too, as the client saw them.
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        vision = models.vision
        return {"status": "ok", "model": models.default.name, **({"vision_model": vision.name} if vision else {})}

    def model_card(served: Servable) -> dict[str, Any]:
        # "capabilities" is smolrun's extension (clients ignore fields they do not know): the playground shows it;
        # null where it is not known before the model loads. So are "loaded" (in memory now, or loaded when a
        # request names it) and "memory_bytes" (weights and KV cache, while loaded): `smolrun ps` reads them.
        loaded = served.engine is not None
        return {"id": served.name, "object": "model", "created": created, "owned_by": "smolrun",
                "capabilities": {"vision": served.sees, "reasoning": served.thinks}, "loaded": loaded,
                "memory_bytes": served.memory if loaded else None}

    @app.get("/metrics", dependencies=[Depends(check_api_key)], include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_api_key)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in models.models]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(check_api_key)])
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        return model_card(get_state(request).models.find(model_id))

    for router in (chat_router, completions_router, responses_router, files_router, containers_router):
        app.include_router(router, dependencies=[Depends(check_api_key)])
    # The playground: static files only, open without the key (it asks for the key and sends it to /v1 itself).
    app.include_router(playground_router)
    return app
