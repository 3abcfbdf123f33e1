"""POST /v1/responses (the code-interpreter loop), retrieval, deletion and input items; SSE events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from smolrun import media
from smolrun.api.chat import cancel_on_disconnect
from smolrun.api.pages import page
from smolrun.api.responses_wire import (
    INCLUDE_OUTPUTS,
    CodeTool,
    ResponsesRequest,
    output_messages,
    parse_format,
    parse_input,
    parse_tools,
)
from smolrun.api.state import AUTO, AppState, get_state
from smolrun.engine import Engine, Prepared
from smolrun.errors import InvalidRequest, SmolrunError
from smolrun.responses_store import StoredResponse
from smolrun.runner import Delta, Finished, Interpreting, ItemAdded, ItemDone, RunEvent, RunSpec, prepare_first, run
from smolrun.sandbox.container import Execution
from smolrun.scheduler import EventStream
from smolrun.turn import Message, Part, SamplingParams

router = APIRouter()
DEFAULT_MAX_TOOL_CALLS = 4


@dataclass
class _Call:
    """One request's state: what the runner needs from the server, and what the response reports."""

    state: AppState
    request: ResponsesRequest
    engine: Engine
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    created_at: int = field(default_factory=lambda: int(time.time()))
    code: CodeTool | None = None
    container_id: str | None = None
    file_ids: tuple[str, ...] = ()
    new_files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> container file
    summary: str | None = None  # reasoning.summary: reasoning items then carry their text as the summary
    input_items: list[dict[str, Any]] = field(default_factory=list)  # the input items with ids, for storing

    async def execute(self, code: str) -> tuple[str, Execution]:
        manager = self.state.containers
        if self.container_id is None:  # auto mode: created at the first code call, never before
            assert self.code is not None
            meta = await manager.call(manager.create, f"auto-{self.id}", 20, self.code.memory_limit,
                                      self.code.file_ids + self.file_ids)
            self.container_id = meta["id"]
        container_id = self.container_id
        result, written = await manager.run_code(container_id, code, None)
        self.new_files.update(written)
        return container_id, result


@router.post("/v1/responses", response_model=None)
async def create_response(body: ResponsesRequest, request: Request) -> JSONResponse | StreamingResponse:
    state = get_state(request)
    pictures = body.has_pictures() or await asyncio.to_thread(_auto_needs_eyes, state, body)
    call = _Call(state, body, state.engine_for(body.model, pictures))
    spec = await _prepare(call)
    # The first model turn is prepared and admitted here, before any byte: its 400s and 429s are statuses.
    first = await prepare_first(spec, call.engine)
    admitted = _Admitted(call.engine.stream(first), call.engine.stream)
    if body.stream:
        return StreamingResponse(_sse(call, spec, first, admitted), media_type="text/event-stream")
    final: dict[str, Any] | None = None
    watcher = asyncio.create_task(cancel_on_disconnect(request, asyncio.current_task()))
    try:
        async for event in _run(call, spec, first, admitted):
            if event["type"] in ("response.completed", "response.incomplete"):
                final = event["response"]
    finally:
        watcher.cancel()
    assert final is not None
    return JSONResponse(final)


async def _prepare(call: _Call) -> RunSpec:
    body, state = call.request, call.state
    fmt = parse_format(body.text)
    reasoning, call.summary = body.parsed_reasoning()
    call.code, tools = parse_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    tools = replace(tools, max_calls=state.settings.max_calls_per_turn)
    engine = call.engine
    parsed = await asyncio.to_thread(parse_input, body.input, engine.profile.code, state.file_bytes)
    history: list[Message] = []
    if body.previous_response_id:
        previous = state.responses.get(body.previous_response_id)
        history = list(previous.context)
        if call.code is not None and call.code.container is None and previous.container_id:
            try:  # auto mode reuses the container of the conversation while it is alive
                state.containers.live(previous.container_id)
                call.container_id = previous.container_id
            except SmolrunError:
                pass
    if call.code is not None and call.code.container is not None:
        state.containers.live(call.code.container)  # 404 or "expired" now, not at the first code call
        call.container_id = call.code.container
    messages = list(parsed.messages)
    shown: tuple[str, ...] = ()  # files a model that sees looks at: pictures, PDF pages, video frames
    if engine.sees and parsed.file_ids:
        shown, message = await asyncio.to_thread(_show_files, state, parsed.file_ids)
        if message is not None:
            messages.append(message)
    unseen = tuple(f for f in parsed.file_ids if f not in shown)
    if unseen and call.code is None:
        messages.append(Message("user", await asyncio.to_thread(_inline_files, state, unseen)))
    elif parsed.file_ids and call.code is not None:
        call.file_ids = parsed.file_ids
        names = [state.files.get(f)["filename"] for f in parsed.file_ids]
        messages.append(Message("user", "Files available: " + ", ".join(f"/mnt/data/{n}" for n in names)))
        if call.container_id is not None:
            for file_id in parsed.file_ids:
                meta, data = await asyncio.to_thread(state.files.content, file_id)
                await state.containers.call(state.containers.add_file, call.container_id, meta["filename"], data)
    system = [Message("system", body.instructions)] if body.instructions else []
    call.input_items = list(parsed.items)
    params = SamplingParams(
        max_tokens=body.max_output_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
    )
    max_calls = DEFAULT_MAX_TOOL_CALLS if body.max_tool_calls is None else body.max_tool_calls
    return RunSpec(tuple(system + history + messages), fmt, params, call.code is not None, max_calls, tools,
                   reasoning, code_required=call.code is not None and call.code.required)


def _input_file_ids(body: ResponsesRequest) -> list[str]:
    if isinstance(body.input, str):
        return []
    return [part["file_id"] for item in body.input if isinstance(item.get("content"), list)
            for part in item["content"] if isinstance(part, dict) and part.get("type") == "input_file"
            and isinstance(part.get("file_id"), str)]


def _auto_needs_eyes(state: AppState, body: ResponsesRequest) -> bool:
    """Whether `auto` should pick the vision model: input files that are pictures, PDFs or videos, or a
    conversation that already holds pictures."""
    if body.model != AUTO or state.vision is None:
        return False
    if body.previous_response_id:
        if any(m.media for m in state.responses.get(body.previous_response_id).context):
            return True
    return any(media.is_media(state.file_bytes(f)) for f in _input_file_ids(body))


def _show_files(state: AppState, file_ids: tuple[str, ...]) -> tuple[tuple[str, ...], Message | None]:
    """The input files that are pictures, PDFs or videos, as one user message with their pages and frames."""
    shown: list[str] = []
    parts: list[Part] = []
    for file_id in file_ids:
        meta, data = state.files.content(file_id)
        if media.is_media(data):
            shown.append(file_id)
            parts += [f"File {meta['filename']}:", *media.load(data, f"input_file {file_id}")]
    return tuple(shown), Message.of("user", parts) if parts else None


def _inline_files(state: AppState, file_ids: tuple[str, ...]) -> str:
    parts = []
    for file_id in file_ids:
        meta, data = state.files.content(file_id)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"{meta['filename']} is not text: give the model the code_interpreter tool to "
                                 "read it", param="input") from None
        parts.append(f"File {meta['filename']}:\n{text[:20000]}")
    return "\n\n".join(parts)


def _shown(call: _Call, item: dict[str, Any]) -> dict[str, Any]:
    """An output item as the client sees it: code outputs only when `include` asks for them, as at OpenAI."""
    if item["type"] == "code_interpreter_call" and INCLUDE_OUTPUTS not in (call.request.include or []):
        return {**item, "outputs": None}
    return item


def _response(call: _Call, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
              incomplete: str | None = None) -> dict[str, Any]:
    body = call.request
    shown = [_shown(call, item) for item in output]
    return {
        "id": call.id, "object": "response", "created_at": call.created_at, "status": status,
        "completed_at": int(time.time()) if status == "completed" else None,
        "model": call.engine.name, "output": shown, "error": None,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": body.instructions, "tools": body.tools, "tool_choice": body.tool_choice or "auto",
        "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        "text": body.text or {"format": {"type": "text"}},
        "reasoning": {"effort": (body.reasoning or {}).get("effort"), "summary": call.summary},
        "usage": usage, "previous_response_id": body.previous_response_id,
        "max_output_tokens": body.max_output_tokens, "max_tool_calls": body.max_tool_calls,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "top_p": body.top_p if body.top_p is not None else 1.0, "store": body.store is not False,
        "metadata": body.metadata or {}, "truncation": "disabled", "background": False,
    }


def _usage(finished: Finished) -> dict[str, Any]:
    return {"input_tokens": finished.input_tokens,
            "input_tokens_details": {"cached_tokens": finished.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": finished.output_tokens,
            "output_tokens_details": {"reasoning_tokens": finished.reasoning_tokens},
            "total_tokens": finished.input_tokens + finished.output_tokens}


def _citations(call: _Call, text: str) -> list[dict[str, Any]]:
    notes = []
    for path, meta in call.new_files.items():
        name = path.rsplit("/", 1)[-1]
        start = text.find(name)
        span = (start, start + len(name)) if start >= 0 else (len(text), len(text))
        notes.append({"type": "container_file_citation", "container_id": meta["container_id"],
                      "file_id": meta["id"], "filename": name, "start_index": span[0], "end_index": span[1]})
    return notes


class _Admitted:
    """`Engine.stream` whose first turn was already admitted: its events come first."""

    def __init__(self, events: EventStream, stream: Callable[[Prepared], EventStream]) -> None:
        self.events: EventStream | None = events
        self.stream = stream

    def __call__(self, prepared: Prepared) -> EventStream:
        events, self.events = self.events, None
        return events if events is not None else self.stream(prepared)


async def _run(call: _Call, spec: RunSpec, first: Prepared, generate: _Admitted) -> AsyncIterator[dict[str, Any]]:
    """The response's events in OpenAI's streaming vocabulary (without sequence numbers)."""
    output: list[dict[str, Any]] = []
    yield {"type": "response.created", "response": _response(call, "in_progress", [], None)}
    yield {"type": "response.in_progress", "response": _response(call, "in_progress", [], None)}
    code_so_far: dict[int, str] = {}
    ids: dict[int, str] = {}  # output index -> item id
    event: RunEvent
    engine = call.engine
    async for event in run(spec, engine, generate, call.execute, first):
        if isinstance(event, ItemAdded):
            item = event.item
            ids[event.index] = item["id"]
            yield {"type": "response.output_item.added", "output_index": event.index, "item": item}
            if item["type"] == "code_interpreter_call":
                yield {"type": "response.code_interpreter_call.in_progress", "output_index": event.index,
                       "item_id": item["id"]}
            elif item["type"] == "message":
                yield {"type": "response.content_part.added", "output_index": event.index, "item_id": item["id"],
                       "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}
            elif item["type"] == "reasoning":
                yield {"type": "response.content_part.added", "output_index": event.index, "item_id": item["id"],
                       "content_index": 0, "part": {"type": "reasoning_text", "text": ""}}
        elif isinstance(event, Delta):
            item_id = ids[event.index]
            if event.kind == "reasoning":
                yield {"type": "response.reasoning_text.delta", "output_index": event.index, "item_id": item_id,
                       "content_index": 0, "delta": event.text}
            elif event.kind == "arguments":
                yield {"type": "response.function_call_arguments.delta", "output_index": event.index,
                       "item_id": item_id, "delta": event.text}
            elif event.kind == "code":
                code_so_far[event.index] = code_so_far.get(event.index, "") + event.text
                yield {"type": "response.code_interpreter_call_code.delta", "output_index": event.index,
                       "item_id": item_id, "delta": event.text}
            else:
                yield {"type": "response.output_text.delta", "output_index": event.index, "item_id": item_id,
                       "content_index": 0, "delta": event.text, "logprobs": []}
        elif isinstance(event, Interpreting):
            item_id = ids[event.index]
            yield {"type": "response.code_interpreter_call_code.done", "output_index": event.index,
                   "item_id": item_id, "code": code_so_far.get(event.index, "")}
            yield {"type": "response.code_interpreter_call.interpreting", "output_index": event.index,
                   "item_id": item_id}
        elif isinstance(event, ItemDone):
            item = event.item
            if item["type"] == "reasoning":
                for e in _reasoning_done_events(call, event.index, item):
                    yield e
                output.append(item)
            elif item["type"] == "function_call":
                yield {"type": "response.function_call_arguments.done", "output_index": event.index,
                       "item_id": item["id"], "name": item["name"], "arguments": item["arguments"]}
                output.append(item)
                yield {"type": "response.output_item.done", "output_index": event.index, "item": item}
            elif item["type"] == "code_interpreter_call":
                if item["status"] == "incomplete":
                    yield {"type": "response.code_interpreter_call_code.done", "output_index": event.index,
                           "item_id": item["id"], "code": item["code"]}
                else:
                    yield {"type": "response.code_interpreter_call.completed", "output_index": event.index,
                           "item_id": item["id"]}
                output.append(item)
                yield {"type": "response.output_item.done", "output_index": event.index, "item": _shown(call, item)}
            else:
                part = item["content"][0]
                part["annotations"] = _citations(call, part["text"])
                for n, note in enumerate(part["annotations"]):
                    yield {"type": "response.output_text.annotation.added", "output_index": event.index,
                           "item_id": item["id"], "content_index": 0, "annotation_index": n, "annotation": note}
                yield {"type": "response.output_text.done", "output_index": event.index, "item_id": item["id"],
                       "content_index": 0, "text": part["text"], "logprobs": []}
                yield {"type": "response.content_part.done", "output_index": event.index, "item_id": item["id"],
                       "content_index": 0, "part": part}
                output.append(item)
                yield {"type": "response.output_item.done", "output_index": event.index, "item": item}
        elif isinstance(event, Finished):
            status = event.status
            final = _response(call, status, output, _usage(event), event.incomplete_reason)
            await asyncio.to_thread(_save, call, spec, output, final)
            yield {"type": f"response.{status}", "response": final}



def _reasoning_done_events(call: _Call, index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
    """A reasoning item's closing events; with `reasoning.summary` its text is also given as the summary
    (smolrun does not summarise thoughts with a second generation)."""
    part = item["content"][0]
    ids = {"output_index": index, "item_id": item["id"]}
    events = [{"type": "response.reasoning_text.done", **ids, "content_index": 0, "text": part["text"]},
              {"type": "response.content_part.done", **ids, "content_index": 0, "part": part}]
    if call.summary is not None:
        summary = {"type": "summary_text", "text": part["text"]}
        item["summary"] = [summary]
        events += [
            {"type": "response.reasoning_summary_part.added", **ids, "summary_index": 0,
             "part": {"type": "summary_text", "text": ""}},
            {"type": "response.reasoning_summary_text.delta", **ids, "summary_index": 0, "delta": part["text"]},
            {"type": "response.reasoning_summary_text.done", **ids, "summary_index": 0, "text": part["text"]},
            {"type": "response.reasoning_summary_part.done", **ids, "summary_index": 0, "part": summary},
        ]
    return [*events, {"type": "response.output_item.done", "output_index": index, "item": item}]


def _save(call: _Call, spec: RunSpec, output: list[dict[str, Any]], final: dict[str, Any]) -> None:
    if call.request.store is False:
        return
    # The conversation a follow-up continues: history and input (not the instructions), then this output.
    # The code outputs the model saw live in the context, so the stored body is the response as returned.
    context = [m for m in spec.messages if m.role != "system"] + output_messages(output, call.engine.profile.code)
    call.state.responses.save(StoredResponse(call.id, call.created_at, final, call.input_items, tuple(context),
                                             call.container_id))


def _data(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


async def _sse(call: _Call, spec: RunSpec, first: Prepared, generate: _Admitted) -> AsyncIterator[str]:
    sequence = 0
    try:
        async for event in _run(call, spec, first, generate):
            yield _data({**event, "sequence_number": sequence})
            sequence += 1
    except Exception as exc:  # headers are sent: report in the stream, as OpenAI does
        error = exc if isinstance(exc, SmolrunError) else SmolrunError(f"internal error: {type(exc).__name__}")
        yield _data({"type": "error", "code": error.code or error.type, "message": error.message,
                     "param": error.param, "sequence_number": sequence})


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request) -> dict[str, Any]:
    return get_state(request).responses.get(response_id).body


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    get_state(request).responses.delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def input_items(response_id: str, request: Request, limit: int = 20, after: str | None = None,
                      order: str = "desc") -> dict[str, Any]:
    items = get_state(request).responses.get(response_id).input_items
    return page(items if order == "asc" else items[::-1], limit, after)
