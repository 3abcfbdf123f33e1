"""POST /v1/chat/completions: request -> Turn -> engine events -> OpenAI JSON or SSE chunks."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from smolrun import __version__
from smolrun.api.metrics import Record, Watched, record_of
from smolrun.api.state import get_state
from smolrun.api.wire import ChatCompletionRequest, sse_json
from smolrun.constraints.grammar import warning_headers
from smolrun.errors import GenerationFailed, SchemaError, client_error
from smolrun.prompt.tools import CallProgress, CallReader, read_calls
from smolrun.turn import DecodeStats, Done, ReasoningDelta, TextDelta, TokenLogprob, ToolCall

router = APIRouter()
FINGERPRINT = f"smolrun-{__version__}"
CLIENT_CLOSED = 499  # nginx's "client closed request": the status of an answer nobody is left to read
log = logging.getLogger("smolrun")
T = TypeVar("T")


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    # Before reading pictures: 400s come cheap.
    engine = await state.engine_for(request, body.model, body.has_pictures())
    record = record_of(request)
    record.model = engine.name
    try:
        turn = await asyncio.to_thread(body.to_turn, state.file_bytes)
        turn = replace(turn, tools=replace(turn.tools, max_calls=state.settings.max_calls_per_turn))
        prepared = await engine.prepare_async(turn)
    except SchemaError as exc:
        if exc.param is not None:
            raise
        raise SchemaError(exc.message, param="response_format") from exc
    top = prepared.params.logprobs
    meta = _Meta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), engine.name, prepared.think is not None,
                 Logprobs(engine.model.token_bytes, top) if top is not None else None)
    record.id = meta.id
    headers = warning_headers(prepared.grammar)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(record.watch(engine.stream(prepared)), meta, include_usage, record),
                                 media_type="text/event-stream", headers=headers)
    events = record.watch(engine.stream(prepared))
    result = await unless_disconnected(request, _complete(events, meta, record), meta.id)
    return Response(status_code=CLIENT_CLOSED) if result is None else JSONResponse(result, headers=headers)


@dataclass(frozen=True)
class _Meta:
    """What every response and chunk of one completion repeats."""

    id: str
    created: int
    model: str
    thinks: bool = False  # the model thinks first: its thoughts go in `reasoning_content`, as in vLLM
    logprobs: Logprobs | None = None  # the request asked for logprobs

    def envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}


@dataclass(frozen=True)
class Logprobs:
    """Tokens' log probabilities in OpenAI's shape: each token's text, logprob and bytes, and the `top` likeliest
    tokens at its place."""

    token_bytes: Callable[[int], bytes]
    top: int

    def content(self, logprobs: Iterable[TokenLogprob]) -> list[dict[str, Any]]:
        return [{**self._token(lp.token, lp.logprob), "top_logprobs": [self._token(t, v) for t, v in lp.top[:self.top]]}
                for lp in logprobs]

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        data = self.token_bytes(token)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}


def usage(stats: DecodeStats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": stats.reasoning_tokens, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
        },
    }


async def _complete(events: Watched, meta: _Meta, record: Record) -> dict[str, Any]:
    parts: list[str] = []
    thoughts: list[str] = []
    done: Done | None = None
    calls = False  # the turn is function calls (the decoder tells each delta's branch)
    logprobs: list[TokenLogprob] = []
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
                calls = calls or event.branch == "calls"
                logprobs += event.logprobs
            elif isinstance(event, ReasoningDelta):
                thoughts.append(event.text)
            else:
                done = event
    finally:
        await events.aclose()
    if done is None:
        raise GenerationFailed("generation ended without a result")
    text = "".join(parts)
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    if meta.thinks:
        message["reasoning_content"] = "".join(thoughts)
    finish: str = done.finish_reason
    if calls:
        # Cut by max_tokens, as at OpenAI: finish_reason "length", the last call's arguments as far as they got.
        message["content"] = None
        message["tool_calls"] = [_wire_call(c) for c in read_calls(text).all]
        finish = "tool_calls" if finish == "stop" else finish
    record.finish = finish
    scores = None
    if meta.logprobs is not None:
        scores = {"content": None if calls else meta.logprobs.content(logprobs), "refusal": None}
    choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": scores}
    return {**meta.envelope("chat.completion"), "choices": [choice], "usage": usage(done.stats),
            "service_tier": "default"}


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T], request_id: str) -> T | None:
    """`work` (a non-streaming answer), unless the client hangs up first: then the work is cancelled, so its
    generation stops instead of running for nobody, one INFO line says so, and the result is None. It runs as
    a task of its own, so that the route's task is never cancelled: a CancelledError escaping the route would be
    the server's "Exception in ASGI application" ERROR, with a traceback, for a client that merely left."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # the work is cancelled when the client left, or when the route itself is (the server stopping)
        watcher.cancel()
        task.cancel()
    if task.done():
        return task.result()
    await asyncio.gather(task, return_exceptions=True)  # its cleanup (the turn's cancellation) runs to the end
    log.info("request %s cancelled: the client disconnected", request_id)
    return None


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


def _chunk(meta: _Meta, delta: dict[str, Any], finish: str | None,
           logprobs: tuple[TokenLogprob, ...] = ()) -> dict[str, Any]:
    scores = {"content": meta.logprobs.content(logprobs), "refusal": None} if meta.logprobs and logprobs else None
    return {**meta.envelope("chat.completion.chunk"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": scores}], "usage": None}


def _data(obj: dict[str, Any]) -> str:
    return f"data: {sse_json(obj)}\n\n"


def _wire_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    wire = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return wire if index is None else {"index": index, **wire}


def _call_deltas(progress: list[CallProgress]) -> list[dict[str, Any]]:
    """Calls as OpenAI streams them: each announced once its name is whole (index, id, name), then its
    arguments as they are generated."""
    deltas: list[dict[str, Any]] = []
    for p in progress:
        if p.new:
            deltas.append({"index": p.index, "id": p.call.id, "type": "function",
                           "function": {"name": p.call.name, "arguments": ""}})
        if p.arguments:
            deltas.append({"index": p.index, "function": {"arguments": p.arguments}})
    return deltas


async def _sse(events: Watched, meta: _Meta, include_usage: bool, record: Record) -> AsyncIterator[str]:
    yield _data(_chunk(meta, {"role": "assistant", "content": "", "refusal": None}, None))
    calls: CallReader | None = None  # set when the turn is function calls
    try:
        async for event in events:
            if isinstance(event, ReasoningDelta):
                yield _data(_chunk(meta, {"reasoning_content": event.text}, None))
                continue
            if isinstance(event, TextDelta):
                if event.branch == "calls":
                    calls = calls or CallReader()
                    for delta in _call_deltas(calls.push(event.text)):
                        yield _data(_chunk(meta, {"tool_calls": [delta]}, None))
                else:
                    yield _data(_chunk(meta, {"content": event.text}, None, event.logprobs))
                continue
            finish: str = event.finish_reason
            if calls is not None and finish == "stop":
                finish = "tool_calls"
            record.finish = finish
            yield _data(_chunk(meta, {}, finish))
            if include_usage:
                yield _data({**meta.envelope("chat.completion.chunk"), "choices": [], "usage": usage(event.stats)})
    except Exception as exc:
        # Headers are sent: the SDK raises APIError on a data object with an "error" key.
        record.finish = "error"
        yield _data(client_error(exc, "in a chat stream").to_dict())
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"
