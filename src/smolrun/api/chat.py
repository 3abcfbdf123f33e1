"""POST /v1/chat/completions: request -> Turn -> engine events -> OpenAI JSON or SSE chunks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from smolrun import __version__
from smolrun.api.state import AppState, get_state
from smolrun.api.wire import ChatCompletionRequest
from smolrun.engine import Prepared
from smolrun.errors import GenerationFailed, SchemaError, SmolrunError
from smolrun.turn import DecodeStats, Done, TextDelta

router = APIRouter()
FINGERPRINT = f"smolrun-{__version__}"


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    state = get_state(request)
    state.check_model(body.model)
    try:
        turn = body.to_turn()
        prepared = await asyncio.to_thread(state.engine.prepare, turn)
    except SchemaError as exc:
        raise SchemaError(exc.message, param="response_format") from exc
    meta = _Meta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.engine.name)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(state, prepared, meta, include_usage), media_type="text/event-stream")
    return JSONResponse(await _complete(state, prepared, meta, request))


@dataclass(frozen=True)
class _Meta:
    """What every response and chunk of one completion repeats."""

    id: str
    created: int
    model: str

    def envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}


def usage(stats: DecodeStats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
        },
    }


async def _events(state: AppState, prepared: Prepared) -> AsyncGenerator[TextDelta | Done, None]:
    async for event in state.scheduler.stream(lambda cancelled: state.engine.generate(prepared, cancelled)):
        yield event


async def _complete(state: AppState, prepared: Prepared, meta: _Meta, request: Request) -> dict[str, Any]:
    parts: list[str] = []
    done: Done | None = None
    events = _events(state, prepared)
    watcher = asyncio.create_task(cancel_on_disconnect(request, asyncio.current_task()))
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                done = event
    finally:
        watcher.cancel()
        await events.aclose()
    if done is None:
        raise GenerationFailed("generation ended without a result")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(parts), "refusal": None, "annotations": []}
    choice = {"index": 0, "message": message, "finish_reason": done.finish_reason, "logprobs": None}
    return {**meta.envelope("chat.completion"), "choices": [choice], "usage": usage(done.stats),
            "service_tier": "default"}


async def cancel_on_disconnect(request: Request, task: asyncio.Task[Any] | None) -> None:
    """A non-streaming client that hangs up cancels its generation instead of leaving it running."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    if task is not None:
        task.cancel()


def _chunk(meta: _Meta, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {**meta.envelope("chat.completion.chunk"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], "usage": None}


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(state: AppState, prepared: Prepared, meta: _Meta, include_usage: bool) -> AsyncIterator[str]:
    yield _data(_chunk(meta, {"role": "assistant", "content": "", "refusal": None}, None))
    events = _events(state, prepared)
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                yield _data(_chunk(meta, {"content": event.text}, None))
                continue
            yield _data(_chunk(meta, {}, event.finish_reason))
            if include_usage:
                yield _data({**meta.envelope("chat.completion.chunk"), "choices": [], "usage": usage(event.stats)})
    except Exception as exc:
        # Headers are sent: the SDK raises APIError on a data object with an "error" key.
        error = exc if isinstance(exc, SmolrunError) else SmolrunError(f"internal error: {type(exc).__name__}")
        yield _data(error.to_dict())
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"
