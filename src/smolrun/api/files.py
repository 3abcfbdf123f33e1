"""The Files API: upload, list, retrieve, download, delete."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from smolrun.api.pages import page
from smolrun.api.state import get_state
from smolrun.files import read_capped

router = APIRouter()


@router.post("/v1/files")
async def create_file(request: Request, file: Annotated[UploadFile, File()],
                      purpose: Annotated[str, Form()]) -> dict[str, Any]:
    state = get_state(request)
    limit = state.settings.max_file_mb * 1024 * 1024
    data = await asyncio.to_thread(read_capped, file.file, limit, file.filename or "the file")
    return await asyncio.to_thread(state.files.add, file.filename or "upload", purpose, data)


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None, limit: int = 10_000, after: str | None = None,
                     order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
    return page(get_state(request).files.list_all(purpose, order), limit, after)


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, request: Request) -> dict[str, Any]:
    return get_state(request).files.get(file_id)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request) -> Response:
    meta, data = await asyncio.to_thread(get_state(request).files.content, file_id)
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": content_disposition(meta["filename"])})


def content_disposition(filename: str) -> str:
    """An attachment header for any file name (RFC 6266): a plain-ASCII `filename` with anything unsafe in a
    quoted string replaced, and the exact name, percent-encoded UTF-8, in `filename*`."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename) or "file"
    exact = quote(filename.encode("utf-8", "surrogateescape"), safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{exact}"


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> dict[str, Any]:
    return await asyncio.to_thread(get_state(request).files.delete, file_id)
