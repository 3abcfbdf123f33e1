"""POST /v1/responses (the code-interpreter loop), retrieval, deletion and input items; SSE events."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from smolrun import media
from smolrun.api.chat import CLIENT_CLOSED, unless_disconnected
from smolrun.api.metrics import Record, Watched, record_of
from smolrun.api.pages import page
from smolrun.api.responses_wire import (
    INCLUDE_OUTPUTS,
    CodeTool,
    ResponsesRequest,
    parse_format,
    parse_input,
    parse_tools,
    wire_item,
)
from smolrun.api.state import AUTO, AppState, get_state
from smolrun.api.wire import sampling, sse_json
from smolrun.backends.decode import Prepared
from smolrun.constraints.grammar import warning_headers
from smolrun.engine import Engine
from smolrun.errors import InvalidRequest, SmolrunError, client_error
from smolrun.responses_store import StoredResponse
from smolrun.runner import (
    CodeCallItem,
    Delta,
    Finished,
    FunctionCallItem,
    Interpreting,
    Item,
    ItemAdded,
    ItemDone,
    MessageItem,
    ReasoningItem,
    RunEvent,
    RunSpec,
    context_messages,
    prepare_first,
    run,
)
from smolrun.sandbox.container import Execution
from smolrun.scheduler import EventStream
from smolrun.turn import Message, Part

router = APIRouter()
DEFAULT_MAX_TOOL_CALLS = 4


@dataclass(frozen=True)
class _Plan:
    """What a request asks for, checked and resolved once, before anything runs."""

    spec: RunSpec
    code: CodeTool | None
    container_id: str | None  # the container it starts in: the one named, or the conversation's live one
    file_ids: tuple[str, ...]  # input files, copied into a container made for it (auto mode)
    summary: str | None  # reasoning.summary: reasoning items then carry their text as the summary
    input_items: tuple[dict[str, Any], ...]  # the input items with ids, for storing


@dataclass
class _Call:
    """One response while it runs: the request, its plan, and what running adds (a container made for it,
    the files its code wrote, the citations of its messages)."""

    state: AppState
    request: ResponsesRequest
    engine: Engine
    plan: _Plan
    record: Record  # for the metrics and the request's log line
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    created_at: int = field(default_factory=lambda: int(time.time()))
    container_id: str | None = field(init=False)  # the plan's, until auto mode makes one at the first code call
    new_files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> container file
    notes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # message id -> its file citations

    def __post_init__(self) -> None:
        self.container_id = self.plan.container_id

    @property
    def summary(self) -> str | None:
        return self.plan.summary

    def wire(self, item: Item) -> dict[str, Any]:
        """An output item as the client sees it: code outputs only when `include` asks for them, as at OpenAI."""
        return wire_item(item, INCLUDE_OUTPUTS in (self.request.include or []), self.summary is not None,
                         self.notes.get(item.id, []))

    async def execute(self, code: str) -> tuple[str, Execution]:
        manager = self.state.containers
        if self.container_id is None:  # auto mode: created at the first code call, never before
            tool = self.plan.code
            assert tool is not None
            meta = await manager.call(manager.create, f"auto-{self.id}", 20, tool.memory_limit,
                                      tool.file_ids + self.plan.file_ids)
            self.container_id = meta["id"]
        container_id = self.container_id
        result, written = await manager.run_code(container_id, code, None)
        self.new_files.update(written)
        return container_id, result


@router.post("/v1/responses", response_model=None)
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    state = get_state(request)
    body.refuse_logprobs()
    pictures = body.has_pictures() or await asyncio.to_thread(_auto_needs_eyes, state, body)
    engine = await state.engine_for(request, body.model, pictures)
    record = record_of(request)
    record.model = engine.name
    call = _Call(state, body, engine, await _plan(state, body, engine), record)
    record.id = call.id
    spec = call.plan.spec
    # The first model turn is prepared and admitted here, before any byte: its 400s and 429s are statuses.
    first = await prepare_first(spec, call.engine)
    admitted = _Admitted(record.watch(call.engine.stream(first)), call.engine.stream, record)
    headers = warning_headers(first.grammar)
    if body.stream:
        return StreamingResponse(_sse(call, spec, first, admitted), media_type="text/event-stream", headers=headers)
    final = await unless_disconnected(request, _final(call, spec, first, admitted), call.id)
    return Response(status_code=CLIENT_CLOSED) if final is None else JSONResponse(final, headers=headers)


async def _final(call: _Call, spec: RunSpec, first: Prepared, admitted: _Admitted) -> dict[str, Any]:
    """The finished response of a non-streaming request."""
    final: dict[str, Any] | None = None
    async for event in _run(call, spec, first, admitted):
        if event["type"] in ("response.completed", "response.incomplete"):
            final = event["response"]
    assert final is not None
    return final


async def _plan(state: AppState, body: ResponsesRequest, engine: Engine) -> _Plan:
    fmt = parse_format(body.text)
    reasoning, summary = body.parsed_reasoning()
    code, tools = parse_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    tools = replace(tools, max_calls=state.settings.max_calls_per_turn)
    parsed = await asyncio.to_thread(parse_input, body.input, engine.profile.code, state.file_bytes)
    history: list[Message] = []
    container_id: str | None = None
    if body.previous_response_id:
        previous = state.responses.get(body.previous_response_id)
        history = list(previous.context)
        if code is not None and code.container is None and previous.container_id:
            try:  # auto mode reuses the container of the conversation while it is alive
                state.containers.live(previous.container_id)
                container_id = previous.container_id
            except SmolrunError:
                pass
    if code is not None and code.container is not None:
        state.containers.live(code.container)  # 404 or "expired" now, not at the first code call
        container_id = code.container
    messages = list(parsed.messages)
    shown: tuple[str, ...] = ()  # files a model that sees looks at: pictures, PDF pages, video frames
    if engine.sees and parsed.file_ids:
        shown, message = await asyncio.to_thread(_show_files, state, parsed.file_ids)
        if message is not None:
            messages.append(message)
    unseen = tuple(f for f in parsed.file_ids if f not in shown)
    file_ids: tuple[str, ...] = ()
    if unseen and code is None:
        messages.append(Message("user", await asyncio.to_thread(_inline_files, state, unseen)))
    elif parsed.file_ids and code is not None:
        file_ids = parsed.file_ids
        names = [state.files.get(f)["filename"] for f in parsed.file_ids]
        messages.append(Message("user", "Files available: " + ", ".join(f"/mnt/data/{n}" for n in names)))
        if container_id is not None:
            for file_id in parsed.file_ids:
                meta, data = await asyncio.to_thread(state.files.content, file_id)
                await state.containers.call(state.containers.add_file, container_id, meta["filename"], data)
    system = [Message("system", body.instructions)] if body.instructions else []
    params = sampling(body.max_output_tokens, body.temperature, body.top_p, body.frequency_penalty,
                      body.presence_penalty, dry=body)
    max_calls = DEFAULT_MAX_TOOL_CALLS if body.max_tool_calls is None else body.max_tool_calls
    spec = RunSpec(tuple(system + history + messages), fmt, params, code is not None, max_calls, tools,
                   reasoning, code_required=code is not None and code.required)
    return _Plan(spec, code, container_id, file_ids, summary, parsed.items)


def _input_file_ids(body: ResponsesRequest) -> list[str]:
    if isinstance(body.input, str):
        return []
    return [part["file_id"] for item in body.input if isinstance(item.get("content"), list)
            for part in item["content"] if isinstance(part, dict) and part.get("type") == "input_file"
            and isinstance(part.get("file_id"), str)]


def _auto_needs_eyes(state: AppState, body: ResponsesRequest) -> bool:
    """Whether `auto` should pick the vision model: input files that are pictures, PDFs or videos, or a
    conversation that already holds pictures."""
    if body.model != AUTO or not any(m.sees is not False for m in state.models.models):
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


def _response(call: _Call, status: str, output: list[Item], usage: dict[str, Any] | None,
              incomplete: str | None = None) -> dict[str, Any]:
    body = call.request
    return {
        "id": call.id, "object": "response", "created_at": call.created_at, "status": status,
        "completed_at": int(time.time()) if status == "completed" else None,
        "model": call.engine.name, "output": [call.wire(item) for item in output], "error": None,
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
    """`Engine.stream` whose first turn was already admitted: its events come first. Every turn's events pass
    the request's record."""

    def __init__(self, events: Watched, stream: Callable[[Prepared, bool], EventStream], record: Record) -> None:
        self.events: Watched | None = events
        self.stream = stream
        self.record = record

    def __call__(self, prepared: Prepared) -> Watched:
        """The first turn's events, then each later turn's, admitted as continuing: never refused."""
        events, self.events = self.events, None
        return events if events is not None else self.record.watch(self.stream(prepared, True))


async def _run(call: _Call, spec: RunSpec, first: Prepared, generate: _Admitted) -> AsyncIterator[dict[str, Any]]:
    """The response's events in OpenAI's streaming vocabulary (without sequence numbers)."""
    output: list[Item] = []
    yield {"type": "response.created", "response": _response(call, "in_progress", [], None)}
    yield {"type": "response.in_progress", "response": _response(call, "in_progress", [], None)}
    code_so_far: dict[int, str] = {}
    ids: dict[int, str] = {}  # output index -> item id
    event: RunEvent
    async for event in run(spec, call.engine, generate, call.execute, first):
        if isinstance(event, ItemAdded):
            item, at = event.item, {"output_index": event.index, "item_id": event.item.id}
            ids[event.index] = item.id
            yield {"type": "response.output_item.added", "output_index": event.index, "item": call.wire(item)}
            if isinstance(item, CodeCallItem):
                yield {"type": "response.code_interpreter_call.in_progress", **at}
            elif isinstance(item, MessageItem):
                yield {"type": "response.content_part.added", **at, "content_index": 0,
                       "part": {"type": "output_text", "text": "", "annotations": []}}
            elif isinstance(item, ReasoningItem):
                yield {"type": "response.content_part.added", **at, "content_index": 0,
                       "part": {"type": "reasoning_text", "text": ""}}
        elif isinstance(event, Delta):
            at = {"output_index": event.index, "item_id": ids[event.index]}
            if event.kind == "reasoning":
                yield {"type": "response.reasoning_text.delta", **at, "content_index": 0, "delta": event.text}
            elif event.kind == "arguments":
                yield {"type": "response.function_call_arguments.delta", **at, "delta": event.text}
            elif event.kind == "code":
                code_so_far[event.index] = code_so_far.get(event.index, "") + event.text
                yield {"type": "response.code_interpreter_call_code.delta", **at, "delta": event.text}
            else:
                yield {"type": "response.output_text.delta", **at, "content_index": 0, "delta": event.text,
                       "logprobs": []}
        elif isinstance(event, Interpreting):
            at = {"output_index": event.index, "item_id": ids[event.index]}
            yield {"type": "response.code_interpreter_call_code.done", **at, "code": code_so_far.get(event.index, "")}
            yield {"type": "response.code_interpreter_call.interpreting", **at}
        elif isinstance(event, ItemDone):
            output.append(event.item)
            for e in _done_events(call, event.index, event.item):
                yield e
        elif isinstance(event, Finished):
            status = event.status
            call.record.finish = status
            final = _response(call, status, output, _usage(event), event.incomplete_reason)
            await asyncio.to_thread(_save, call, spec, output, final)
            yield {"type": f"response.{status}", "response": final}


def _done_events(call: _Call, index: int, item: Item) -> list[dict[str, Any]]:
    """The events that close an output item, ending with output_item.done."""
    at = {"output_index": index, "item_id": item.id}
    events: list[dict[str, Any]] = []
    if isinstance(item, MessageItem):  # its citations first: they are part of the item as sent
        call.notes[item.id] = _citations(call, item.text)
    wired = call.wire(item)
    if isinstance(item, ReasoningItem):
        part = wired["content"][0]
        events += [{"type": "response.reasoning_text.done", **at, "content_index": 0, "text": item.text},
                   {"type": "response.content_part.done", **at, "content_index": 0, "part": part}]
        if call.summary is not None:  # its text is the summary: smolrun does not summarise with a second generation
            summary = wired["summary"][0]
            events += [
                {"type": "response.reasoning_summary_part.added", **at, "summary_index": 0,
                 "part": {"type": "summary_text", "text": ""}},
                {"type": "response.reasoning_summary_text.delta", **at, "summary_index": 0, "delta": item.text},
                {"type": "response.reasoning_summary_text.done", **at, "summary_index": 0, "text": item.text},
                {"type": "response.reasoning_summary_part.done", **at, "summary_index": 0, "part": summary},
            ]
    elif isinstance(item, FunctionCallItem):
        events.append({"type": "response.function_call_arguments.done", **at, "name": item.name,
                       "arguments": item.arguments})
    elif isinstance(item, CodeCallItem):
        if item.status == "incomplete":
            events.append({"type": "response.code_interpreter_call_code.done", **at, "code": item.code})
        else:
            events.append({"type": "response.code_interpreter_call.completed", **at})
    else:
        part = wired["content"][0]
        events += [{"type": "response.output_text.annotation.added", **at, "content_index": 0, "annotation_index": n,
                    "annotation": note} for n, note in enumerate(part["annotations"])]
        events += [{"type": "response.output_text.done", **at, "content_index": 0, "text": item.text,
                    "logprobs": []},
                   {"type": "response.content_part.done", **at, "content_index": 0, "part": part}]
    return [*events, {"type": "response.output_item.done", "output_index": index, "item": wired}]


def _save(call: _Call, spec: RunSpec, output: list[Item], final: dict[str, Any]) -> None:
    if call.request.store is False:
        return
    # The conversation a follow-up continues: history and input (not the instructions), then this output.
    # The code outputs the model saw live in the context (as observations), so the stored body is the response
    # as returned.
    engine = call.engine
    context = [m for m in spec.messages if m.role != "system"] + context_messages(output, engine.profile.code,
                                                                                   engine.sees)
    call.state.responses.save(StoredResponse(call.id, call.created_at, final, list(call.plan.input_items),
                                             tuple(context), call.container_id))


def _data(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {sse_json(event)}\n\n"


async def _sse(call: _Call, spec: RunSpec, first: Prepared, generate: _Admitted) -> AsyncIterator[str]:
    sequence = 0
    try:
        async for event in _run(call, spec, first, generate):
            yield _data({**event, "sequence_number": sequence})
            sequence += 1
    except Exception as exc:  # headers are sent: report in the stream, as OpenAI does
        call.record.finish = "error"
        error = client_error(exc, "in a responses stream")
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
