"""The legacy Completions API: `POST /v1/completions`, a prompt continued as it is (no chat template).

Each prompt and each of its `n` samples is one turn of the engine, all admitted before the response starts (so a
full queue is a 429 with nothing generated) and decoded together; choice `i * n + j` is sample j of prompt i.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from smolrun.api.chat import CLIENT_CLOSED, FINGERPRINT, _data, unless_disconnected
from smolrun.api.metrics import Record, Watched, record_of
from smolrun.api.state import get_state
from smolrun.api.wire import CompletionRequest
from smolrun.backends.decode import Prepared
from smolrun.constraints.grammar import warning_headers
from smolrun.engine import Engine
from smolrun.errors import GenerationFailed, client_error
from smolrun.scheduler import EventStream
from smolrun.turn import DecodeStats, Done, TextDelta, TokenLogprob

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = get_state(request)
    engine = await state.engine_for(request, body.model, pictures=False)
    record = record_of(request)
    record.model = engine.name
    fmt, params = body.params()
    prompts = body.prompts()
    prepared = []
    for prompt in prompts:
        for j in range(body.n):  # each sample its own seed, so that n samples of one seeded prompt differ
            seeded = params if params.seed is None or j == 0 else replace(params, seed=(params.seed + j) % 2**63)
            prepared.append(await engine.prepare_prompt_async(prompt, fmt, seeded))
    meta = _Meta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), engine.name,
                 [(_text(engine, p) if body.echo else "") for p in prompts for _ in range(body.n)],
                 [p.prompt for p in prepared], engine.model.token_bytes, params.logprobs)
    record.id = meta.id
    headers = warning_headers(prepared[0].grammar)
    streams = _admit(engine, prepared)  # every one or none: a 429 leaves nothing running
    watched = [record.watch(s) for s in streams]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(watched, meta, include_usage, record), media_type="text/event-stream",
                                 headers=headers)
    result = await unless_disconnected(request, _complete(watched, meta, record), meta.id)
    return Response(status_code=CLIENT_CLOSED) if result is None else JSONResponse(result, headers=headers)


def _text(engine: Engine, prompt: str | list[int]) -> str:
    if isinstance(prompt, str):
        return prompt
    return b"".join(engine.model.token_bytes(t) for t in prompt).decode("utf-8", errors="replace")


def _admit(engine: Engine, prepared: list[Prepared]) -> list[EventStream]:
    streams: list[EventStream] = []
    try:
        for p in prepared:
            streams.append(engine.stream(p))
    except BaseException:
        for s in streams:
            s.cancelled.set()
        raise
    return streams


@dataclass(frozen=True)
class _Meta:
    id: str
    created: int
    model: str
    echoes: list[str]  # each choice's prompt text when `echo`, else ""
    prompts: list[list[int]]  # each choice's prompt tokens
    token_bytes: Callable[[int], bytes]
    top: int | None  # logprobs asked for: the likeliest tokens at each place

    def envelope(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}


class _Logprobs:
    """One choice's logprobs in the legacy shape: parallel lists of tokens, their logprobs, the likeliest tokens
    at each place (a token text -> logprob map) and each token's offset in the choice's text."""

    def __init__(self, meta: _Meta, offset: int) -> None:
        self.meta, self.offset = meta, offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def first(self, token: int) -> None:
        """The prompt's first token, which nothing predicts: null, as at OpenAI and vLLM."""
        text = self._text(token)
        self.tokens.append(text)
        self.token_logprobs.append(None)
        self.top.append(None)
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def add(self, logprobs: tuple[TokenLogprob, ...]) -> None:
        for lp in logprobs:
            text = self._text(lp.token)
            self.tokens.append(text)
            self.token_logprobs.append(lp.logprob)
            self.top.append({self._text(t): v for t, v in lp.top[: self.meta.top or 0]})
            self.text_offset.append(self.offset)
            self.offset += len(text)

    def wire(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top,
                "text_offset": self.text_offset}

    def _text(self, token: int) -> str:
        return self.meta.token_bytes(token).decode("utf-8", errors="replace")


def _usage(stats: list[DecodeStats]) -> dict[str, Any]:
    prompt = sum(s.prompt_tokens for s in stats)
    completion = sum(s.completion_tokens for s in stats)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in stats), "audio_tokens": 0}}


async def _one(events: Watched) -> tuple[str, list[tuple[TokenLogprob, ...]], Done]:
    parts: list[str] = []
    logprobs: list[tuple[TokenLogprob, ...]] = []
    done: Done | None = None
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
                logprobs.append(event.logprobs)
            elif isinstance(event, Done):
                done = event
    finally:
        await events.aclose()
    if done is None:
        raise GenerationFailed("generation ended without a result")
    return "".join(parts), logprobs, done


async def _complete(streams: list[Watched], meta: _Meta, record: Record) -> dict[str, Any]:
    tasks = [asyncio.ensure_future(_one(s)) for s in streams]
    try:
        results = await asyncio.gather(*tasks)
    finally:  # one failed, or the client left: the others stop too
        for task in tasks:
            task.cancel()
    choices: list[dict[str, Any]] = []
    for index, ((text, logprobs, done), echo, prompt) in enumerate(zip(results, meta.echoes, meta.prompts,
                                                                        strict=True)):
        scores = None
        if meta.top is not None:
            scores = _Logprobs(meta, len(echo))
            if echo:  # the prompt's tokens come first, as the text does
                scores.offset = 0
                scores.first(prompt[0])
                scores.add(done.prompt_logprobs)
            for piece in logprobs:
                scores.add(piece)
        choices.append({"text": echo + text, "index": index, "logprobs": scores.wire() if scores else None,
                        "finish_reason": "length" if done.finish_reason == "length" else "stop"})
    record.finish = ",".join(sorted({str(c["finish_reason"]) for c in choices}))
    return {**meta.envelope(), "choices": choices, "usage": _usage([r[2].stats for r in results])}


async def _sse(streams: list[Watched], meta: _Meta, include_usage: bool, record: Record) -> AsyncIterator[str]:
    """Every choice's text as it comes, each chunk naming its choice's index; then [DONE]."""
    merged: asyncio.Queue[tuple[int, TextDelta | Done] | Exception | None] = asyncio.Queue()

    async def pump(index: int, events: Watched) -> None:
        try:
            async for event in events:
                if isinstance(event, TextDelta | Done):
                    await merged.put((index, event))
        except Exception as exc:  # noqa: BLE001 - handed to the response, which ends with it
            await merged.put(exc)
        finally:
            await events.aclose()
            await merged.put(None)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    scores = [_Logprobs(meta, len(echo)) for echo in meta.echoes]
    stats: list[DecodeStats] = []
    finishes: set[str] = set()
    try:
        for index, echo in enumerate(meta.echoes):
            if echo:
                yield _data(_chunk(meta, index, echo, None, None))
        ended = 0
        while ended < len(tasks):
            item = await merged.get()
            if item is None:
                ended += 1
                continue
            if isinstance(item, Exception):
                record.finish = "error"
                yield _data(client_error(item, "in a completion stream").to_dict())
                break
            index, event = item
            if isinstance(event, TextDelta):
                logprobs = None
                if meta.top is not None:
                    piece = _Logprobs(meta, scores[index].offset)
                    piece.add(event.logprobs)
                    scores[index].offset = piece.offset
                    logprobs = piece.wire()
                yield _data(_chunk(meta, index, event.text, logprobs, None))
            else:
                finish = "length" if event.finish_reason == "length" else "stop"
                finishes.add(finish)
                stats.append(event.stats)
                yield _data(_chunk(meta, index, "", None, finish))
        else:
            record.finish = ",".join(sorted(finishes))
            if include_usage:
                yield _data({**meta.envelope(), "choices": [], "usage": _usage(stats)})
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()
    yield "data: [DONE]\n\n"


def _chunk(meta: _Meta, index: int, text: str, logprobs: dict[str, Any] | None,
           finish: str | None) -> dict[str, Any]:
    return {**meta.envelope(), "choices": [{"text": text, "index": index, "logprobs": logprobs,
                                            "finish_reason": finish}]}
