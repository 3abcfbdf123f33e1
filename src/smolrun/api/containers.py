"""The Containers API (OpenAI's shapes) and `POST /v1/containers/{id}/exec`, smolrun's direct execution."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import asdict
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from smolrun.api.pages import page
from smolrun.api.state import get_state
from smolrun.api.wire import refuse_null
from smolrun.errors import InvalidRequest
from smolrun.files import read_capped

router = APIRouter()


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(strict=True)
    anchor: Literal["last_active_at"] = "last_active_at"
    minutes: int = Field(20, ge=1, le=1440)


class CreateContainer(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(min_length=1, max_length=256)
    expires_after: ExpiresAfter | None = None
    file_ids: list[str] = []
    memory_limit: Literal["1g", "4g", "16g", "64g"] = "1g"
    _not_null = refuse_null("expires_after", "file_ids", "memory_limit")


class ExecRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    code: str
    timeout: float | None = Field(default=None, gt=0, le=3600)


@router.post("/v1/containers")
async def create_container(body: CreateContainer, request: Request) -> dict[str, Any]:
    minutes = body.expires_after.minutes if body.expires_after else 20
    manager = get_state(request).containers
    return await manager.call(manager.create, body.name, minutes, body.memory_limit, tuple(body.file_ids))


@router.get("/v1/containers")
async def list_containers(request: Request, limit: int = 20, after: str | None = None,
                          order: Literal["asc", "desc"] = "desc", name: str | None = None) -> dict[str, Any]:
    return page(get_state(request).containers.list_all(order, name), limit, after)


@router.get("/v1/containers/{container_id}")
async def retrieve_container(container_id: str, request: Request) -> dict[str, Any]:
    return get_state(request).containers.get(container_id)


@router.delete("/v1/containers/{container_id}")
async def delete_container(container_id: str, request: Request) -> dict[str, Any]:
    manager = get_state(request).containers
    return await manager.call(manager.delete, container_id)


@router.post("/v1/containers/{container_id}/files")
async def add_container_file(container_id: str, request: Request) -> dict[str, Any]:
    """Multipart with `file`, or JSON with `file_id` (a Files API upload), as OpenAI accepts."""
    state = get_state(request)
    limit = state.settings.max_file_mb * 1024 * 1024
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form() as form:  # closes the spooled upload files
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise InvalidRequest("send the file as the multipart field 'file'", param="file")
            data = await asyncio.to_thread(read_capped, upload.file, limit, upload.filename or "the file")
            name = upload.filename or "upload"
    else:
        try:
            body = await request.json()
        except ValueError:
            raise InvalidRequest("send multipart 'file' or JSON {\"file_id\": ...}") from None
        file_id = body.get("file_id") if isinstance(body, dict) else None
        if not isinstance(file_id, str):
            raise InvalidRequest("send multipart 'file' or JSON {\"file_id\": ...}", param="file_id")
        meta, data = await asyncio.to_thread(state.files.content, file_id)
        name = meta["filename"]
    return await state.containers.call(state.containers.add_file, container_id, name, data)


@router.get("/v1/containers/{container_id}/files")
async def list_container_files(container_id: str, request: Request, limit: int = 20, after: str | None = None,
                               order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
    manager = get_state(request).containers
    items = await manager.call(manager.list_files, container_id, order)
    return page(items, limit, after)


@router.get("/v1/containers/{container_id}/files/{file_id}")
async def retrieve_container_file(container_id: str, file_id: str, request: Request) -> dict[str, Any]:
    manager = get_state(request).containers
    await manager.call(manager.sync_files, container_id)
    return manager.file(container_id, file_id)


@router.get("/v1/containers/{container_id}/files/{file_id}/content")
async def container_file_content(container_id: str, file_id: str, request: Request) -> Response:
    state = get_state(request)
    _, data = await state.containers.call(state.containers.file_content, container_id, file_id,
                                          state.settings.max_file_mb * 1024 * 1024)
    return Response(data, media_type="application/octet-stream")


@router.delete("/v1/containers/{container_id}/files/{file_id}")
async def delete_container_file(container_id: str, file_id: str, request: Request) -> dict[str, Any]:
    manager = get_state(request).containers
    return await manager.call(manager.delete_file, container_id, file_id)


@router.post("/v1/containers/{container_id}/exec")
async def exec_code(container_id: str, body: ExecRequest, request: Request) -> dict[str, Any]:
    """Run code in the container directly (smolrun's extension): the same sandbox as model-written code."""
    manager = get_state(request).containers
    result, written = await manager.run_code(container_id, body.code, body.timeout)
    return {
        "object": "container.execution",
        "container_id": container_id,
        "logs": result.logs,
        "result": result.result,
        "error": asdict(result.error) if result.error is not None else None,
        "images": [f"data:image/png;base64,{base64.b64encode(png).decode()}" for png in result.images],
        "files": [{"path": path, "id": meta["id"]} for path, meta in written.items()],
        "duration_ms": round(result.duration_s * 1000, 1),
        "timed_out": result.timed_out,
        "state_lost": result.state_lost,
    }
