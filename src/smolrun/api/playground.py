"""The playground: a page at `/` that uses the public API like any client (its files are in playground/)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from smolrun.errors import NotFound

ROOT = Path(__file__).resolve().parent.parent / "playground"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return _asset("index.html")


@router.get("/playground/{name:path}")
async def asset(name: str) -> FileResponse:
    return _asset(name)


def _asset(name: str) -> FileResponse:
    path = (ROOT / name).resolve()
    # Only the playground's own files, by their exact names: nothing outside its folder, nothing unlisted.
    if not path.is_relative_to(ROOT) or not path.is_file() or path.suffix not in TYPES:
        raise NotFound(f"Unknown request URL: GET /playground/{name}")
    return FileResponse(path, media_type=TYPES[path.suffix], headers={"Cache-Control": "no-cache"})
