"""What the routes share: the engines, the stores and the settings; which engine serves a request."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from smolrun.config import Settings
from smolrun.engine import Engine
from smolrun.errors import InvalidRequest, ModelNotFound
from smolrun.files import FileStore
from smolrun.models import REGISTRY
from smolrun.responses_store import ResponseStore
from smolrun.sandbox.manager import ContainerManager

AUTO = "auto"  # the model alias that routes by content: the vision model for pictures, else the text model


@dataclass
class AppState:
    settings: Settings
    engine: Engine  # the text model (--model), also the default
    files: FileStore
    containers: ContainerManager
    responses: ResponseStore
    vision: Engine | None = None  # the vision model (--vision-model), if any

    @property
    def engines(self) -> tuple[Engine, ...]:
        return (self.engine,) if self.vision is None else (self.engine, self.vision)

    def _named(self, requested: str) -> Engine | None:
        if requested in {self.engine.name, self.settings.model}:
            return self.engine
        if self.vision is not None and requested in {self.vision.name, self.settings.vision_model}:
            return self.vision
        return None

    def check_model(self, requested: str) -> None:
        """Accept a served model's name, the registry name/path it was started from, or `auto`."""
        if requested == AUTO or self._named(requested) is not None:
            return
        served = " and ".join(f"'{e.name}'" for e in self.engines)
        raise ModelNotFound(
            f"The model '{requested}' does not exist on this server; it serves {served} (and '{AUTO}', which "
            "picks by content)"
            + (f"; start a server with --model {requested} to use that one" if requested in REGISTRY else ""),
            param="model",
        )

    def engine_for(self, requested: str, pictures: bool) -> Engine:
        """The engine that answers: the named one, or for `auto` the vision model when the request has
        pictures. A request with pictures for a model that cannot see is a 400 naming those that can."""
        self.check_model(requested)
        engine = self._named(requested)
        if engine is None:  # auto
            engine = self.vision if pictures and self.vision is not None else self.engine
        if pictures and not engine.sees:
            seeing = [e.name for e in self.engines if e.sees]
            where = (f"models on this server that can: {', '.join(repr(n) for n in seeing)} (or '{AUTO}')"
                     if seeing else "no model on this server can; start it with --vision-model smolvlm2-2.2b")
            raise InvalidRequest(f"The model '{engine.name}' cannot see images; {where}", param="model")
        return engine

    def file_bytes(self, file_id: str) -> bytes:
        return self.files.content(file_id)[1]


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.smolrun
    return state
