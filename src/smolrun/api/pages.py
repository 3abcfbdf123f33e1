"""OpenAI's cursor pages: `limit`, `after`, `order` over a list of objects with ids."""

from __future__ import annotations

from typing import Any

from smolrun.errors import InvalidRequest


def page(items: list[dict[str, Any]], limit: int, after: str | None) -> dict[str, Any]:
    if not 1 <= limit <= 10_000:
        raise InvalidRequest("'limit' must be between 1 and 10000", param="limit")
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise InvalidRequest(f"'after' names no object of this list: {after}", param="after")
        start = ids.index(after) + 1
    data = items[start : start + limit]
    # OpenAI's spec types first_id and last_id as required strings: an empty page sends "", not null.
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else "",
            "last_id": data[-1]["id"] if data else "", "has_more": start + limit < len(items)}
