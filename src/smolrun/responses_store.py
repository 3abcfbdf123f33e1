"""Stored Responses: what a response returned, its input items, and the conversation a follow-up continues.

The conversation is kept in a written format (version 1), one JSON object per message:

    {"role": "user" | "assistant" | "system" | "tool", "content": str, "tool_call_id": str | null,
     "tool_calls": [[id, name, arguments], ...],
     "parts": [{"text": str} | {"image": base64, "detail": "low" | "high" | "auto"}
               | {"video": [base64, ...], "seconds": [float, ...], "duration": float}, ...]}

`parts` is empty for a message without pictures (its `content` is the whole text).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from smolrun.errors import NotFound
from smolrun.store import Store
from smolrun.turn import Image, Message, Part, ToolCall, Video


@dataclass(frozen=True)
class StoredResponse:
    id: str
    created_at: int
    body: dict[str, Any]  # the response object as returned
    input_items: list[dict[str, Any]]
    context: tuple[Message, ...]  # the conversation so far, this response's output included
    container_id: str | None


class ResponseStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    def save(self, response: StoredResponse) -> None:
        self.store.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?)", response.id, response.created_at,
                           json.dumps(response.body), json.dumps(response.input_items),
                           json.dumps([message_to_json(m) for m in response.context]), response.container_id)

    def get(self, response_id: str) -> StoredResponse:
        row = self.store.one("SELECT * FROM responses WHERE id = ?", response_id)
        if row is None:
            raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
        return StoredResponse(row["id"], row["created_at"], json.loads(row["body"]), json.loads(row["input_items"]),
                              tuple(message_from_json(m) for m in json.loads(row["context"])), row["container_id"])

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        self.store.execute("DELETE FROM responses WHERE id = ?", response_id)


def message_to_json(m: Message) -> dict[str, Any]:
    return {"role": m.role, "content": m.content, "tool_call_id": m.tool_call_id,
            "tool_calls": [[c.id, c.name, c.arguments] for c in m.tool_calls],
            "parts": [_part_to_json(p) for p in m.parts]}


def message_from_json(data: dict[str, Any]) -> Message:
    calls = tuple(ToolCall(*c) for c in data.get("tool_calls") or ())
    parts = tuple(_part_from_json(p) for p in data.get("parts") or ())
    return Message(data["role"], data["content"], calls, data.get("tool_call_id"), parts)


def _part_to_json(part: Part) -> dict[str, Any]:
    if isinstance(part, str):
        return {"text": part}
    if isinstance(part, Image):
        return {"image": base64.b64encode(part.data).decode(), "detail": part.detail}
    return {"video": [base64.b64encode(f).decode() for f in part.frames], "seconds": list(part.seconds),
            "duration": part.duration}


def _part_from_json(data: dict[str, Any]) -> Part:
    if "text" in data:
        return str(data["text"])
    if "image" in data:
        return Image(base64.b64decode(data["image"]), data["detail"])
    return Video(tuple(base64.b64decode(f) for f in data["video"]), tuple(data["seconds"]), data["duration"])
