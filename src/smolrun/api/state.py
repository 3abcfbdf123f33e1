"""What the routes share: the engine, the scheduler and the settings."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from fastapi import Request

from smolrun.config import Settings
from smolrun.engine import Engine, Prepared
from smolrun.errors import ModelNotFound
from smolrun.files import FileStore
from smolrun.models import REGISTRY
from smolrun.sandbox.manager import ContainerManager
from smolrun.scheduler import Scheduler
from smolrun.turn import Event


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    scheduler: Scheduler
    files: FileStore
    containers: ContainerManager

    async def generate(self, prepared: Prepared) -> AsyncGenerator[Event, None]:
        """One model turn through the shared queue; leaving early cancels it."""
        engine = self.engine
        async for event in self.scheduler.stream(lambda cancelled: engine.generate(prepared, cancelled)):
            yield event

    def check_model(self, requested: str) -> None:
        """Accept the served model's name, or the registry name/path it was started from."""
        if requested in {self.engine.name, self.settings.model}:
            return
        raise ModelNotFound(
            f"The model '{requested}' does not exist on this server; it serves '{self.engine.name}'"
            + (f" (start a server with --model {requested} to use that one)" if requested in REGISTRY else ""),
            param="model",
        )


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.smolrun
    return state
