"""What the routes share: the models, the stores and the settings; which engine serves a request."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from smolrun.config import Settings
from smolrun.engine import Engine
from smolrun.files import FileStore
from smolrun.pool import AUTO, ModelPool, Release
from smolrun.responses_store import ResponseStore
from smolrun.sandbox.manager import ContainerManager

__all__ = ["AUTO", "AppState", "Leases", "get_state"]
_LEASES = "smolrun.leases"  # where a request's leases on models sit in its ASGI scope, until it is over


@dataclass
class AppState:
    settings: Settings
    models: ModelPool
    files: FileStore
    containers: ContainerManager
    responses: ResponseStore

    async def engine_for(self, request: Request, requested: str, pictures: bool) -> Engine:
        """The engine that answers this request (see ModelPool.pick), loaded, and held for it until its response
        has ended (`Leases` lets go): an engine is never unloaded under a request that uses it."""
        engine, release = await self.models.acquire(requested, pictures)
        leases: list[Release] = request.scope.setdefault(_LEASES, [])  # set by Leases, outside the app
        leases.append(release)
        return engine

    def file_bytes(self, file_id: str) -> bytes:
        return self.files.content(file_id)[1]


class Leases:
    """Lets go of a request's models once the app is done with it: its response sent (a stream to its end), or
    the client gone."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        leases: list[Release] = []
        scope[_LEASES] = leases
        try:
            await self.app(scope, receive, send)
        finally:
            for release in leases:
                release()


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.smolrun
    return state
