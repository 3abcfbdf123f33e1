"""The reason -> execute -> answer loop of one Responses request, bounded, emitting typed events.

Each model turn is generated under a turn grammar that allows one code call (in the model's format: a
fenced python block, or SmolLM3's <code> tags) or the final answer (under the requested format). Code runs
in the request's container; its output goes back to the model as the next user turn. After `max_tool_calls`
only the answer is allowed.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal

from smolrun.backends.decode import Prepared
from smolrun.engine import Engine
from smolrun.errors import InvalidRequest
from smolrun.prompt.profiles import CodeFormat
from smolrun.prompt.tools import CallReader
from smolrun.sandbox.container import Execution
from smolrun.turn import (
    DEFAULT_REASONING,
    NO_TOOLS,
    Branch,
    Done,
    Event,
    Image,
    Message,
    Part,
    Reasoning,
    ReasoningDelta,
    ResponseFormat,
    SamplingParams,
    ToolCall,
    ToolUse,
    Turn,
)


def code_instructions(code: CodeFormat) -> str:
    return (f"You can run Python code: reply with {code.described} and nothing else, and you will get its "
            "output. Variables persist between runs; files are in /mnt/data. When you have what you need, reply "
            "with the final answer (no code).")
OBSERVATION_CHARS = 2000  # code output shown to a small model: more would crowd out the question


@dataclass(frozen=True)
class RunSpec:
    messages: tuple[Message, ...]
    format: ResponseFormat
    params: SamplingParams  # max_tokens: the whole response's output budget
    code: bool  # the code interpreter is enabled
    max_tool_calls: int = 4
    tools: ToolUse = NO_TOOLS  # function tools: a turn of calls ends the response, for the client to run
    reasoning: Reasoning = DEFAULT_REASONING
    code_required: bool = False  # tool_choice "required" with the code interpreter alone: code at least once


Status = Literal["in_progress", "completed", "incomplete"]


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ReasoningItem:
    """A thinking model's think block."""

    id: str
    text: str = ""
    status: Status = "in_progress"


@dataclass(frozen=True)
class CodeCallItem:
    """One code call: its code, and once it ran, the container and what it produced."""

    id: str
    code: str = ""
    container_id: str = ""
    status: Status = "in_progress"
    result: Execution | None = None


@dataclass(frozen=True)
class MessageItem:
    """The answer's text (under the requested format)."""

    id: str
    text: str = ""
    status: Status = "in_progress"


@dataclass(frozen=True)
class FunctionCallItem:
    """A call of one of the client's functions: the response ends with it, for the client to run."""

    id: str
    call_id: str
    name: str
    arguments: str = ""
    status: Status = "in_progress"


Item = ReasoningItem | CodeCallItem | MessageItem | FunctionCallItem


@dataclass(frozen=True)
class ItemAdded:
    index: int
    item: Item


@dataclass(frozen=True)
class Delta:
    index: int
    kind: Literal["code", "text", "arguments", "reasoning"]
    text: str


@dataclass(frozen=True)
class Interpreting:
    index: int


@dataclass(frozen=True)
class ItemDone:
    index: int
    item: Item


@dataclass(frozen=True)
class Finished:
    status: Literal["completed", "incomplete"]
    input_tokens: int
    output_tokens: int
    incomplete_reason: str | None = None
    reasoning_tokens: int = 0
    cached_tokens: int = 0  # of input_tokens, those the KV cache already held


RunEvent = ItemAdded | Delta | Interpreting | ItemDone | Finished
Generate = Callable[[Prepared], AsyncIterator[Event]]
Execute = Callable[[str], Awaitable[tuple[str, Execution]]]  # code -> (container id, result)


class _CallItems:
    """A turn of function calls as the Responses API streams them: each call's item once its name is whole,
    its arguments as they are generated, done when the next call starts or the turn ends (a call cut by
    max_output_tokens is done as incomplete, its arguments as far as they got)."""

    def __init__(self, first: int) -> None:
        self.first = first  # the output index of the turn's first call
        self.reader = CallReader()
        self.items: list[FunctionCallItem] = []

    def push(self, text: str) -> list[RunEvent]:
        events: list[RunEvent] = []
        for p in self.reader.push(text):
            if p.new:
                if p.index > 0:  # the call before is complete now
                    events.append(self._done(p.index - 1, "completed"))
                self.items.append(FunctionCallItem(_new_id("fc"), p.call.id, p.call.name))
                events.append(ItemAdded(self.first + p.index, self.items[p.index]))
            if p.arguments:
                events.append(Delta(self.first + p.index, "arguments", p.arguments))
        return events

    def finish(self) -> list[RunEvent]:
        if not self.items:
            return []
        last = self.reader.calls.all[-1]
        return [self._done(len(self.items) - 1, "incomplete" if last is self.reader.calls.partial else "completed")]

    def _done(self, k: int, status: Status) -> ItemDone:
        return ItemDone(self.first + k, replace(self.items[k], arguments=self.reader.calls.all[k].arguments,
                                                status=status))


@dataclass
class _Split:
    """A model turn's text as it streams, by the branch the decoder read from its tokens: a code call without
    its tags, an answer as it is, function calls kept whole (their items come from the call reader)."""

    code_format: CodeFormat
    kind: Branch | None = None
    raw: str = ""
    sent: int = 0  # characters of the body already emitted

    def push(self, text: str, branch: Branch) -> str:
        self.kind = branch
        self.raw += text
        if branch == "calls":
            return ""
        body = self.body(final=False)
        out, self.sent = body[self.sent :], len(body)
        return out

    def body(self, final: bool) -> str:
        if self.kind != "code":
            return self.raw
        fmt = self.code_format
        code = self.raw[len(fmt.open) :] if self.raw.startswith(fmt.open) else ""
        if not final:
            return code[: max(0, len(code) - len(fmt.close))]  # hold back a possible closing tag
        return code.removesuffix(fmt.close.lstrip("\n")).removesuffix("\n")

    def rest(self) -> str:
        if self.kind == "calls":
            return ""
        body = self.body(final=True)
        return body[self.sent :] if len(body) >= self.sent else ""


def _conversation(spec: RunSpec, engine: Engine) -> list[Message]:
    conversation = list(spec.messages)
    if spec.code:
        conversation = _with_instructions(conversation, code_instructions(engine.profile.code))
    return conversation


async def prepare_first(spec: RunSpec, engine: Engine) -> Prepared:
    """The loop's first model turn, prepared: a route prepares and admits it before its response starts, so
    that its 400s and 429s are HTTP statuses (see `run`'s `first`)."""
    turn = Turn(tuple(_conversation(spec, engine)), spec.format, spec.params, spec.tools, spec.reasoning)
    try:
        return await engine.prepare_async(turn, *_code_mode(spec, 0))
    except InvalidRequest as exc:
        if exc.param != "max_tokens":
            raise
        # The Responses API names the budget max_output_tokens.
        raise type(exc)(exc.message.replace("max_tokens", "max_output_tokens"), param="max_output_tokens",
                        code=exc.code) from exc


def _code_mode(spec: RunSpec, calls: int) -> tuple[bool, bool]:
    """Whether the next model turn may be a code call, and whether it must be, after `calls` of them."""
    return spec.code and calls < spec.max_tool_calls, spec.code_required and calls == 0


async def run(spec: RunSpec, engine: Engine, generate: Generate, execute: Execute,
              first: Prepared | None = None) -> AsyncIterator[RunEvent]:
    """The loop; `first`, when given, is `prepare_first`'s turn (and `generate` already admitted it)."""
    conversation = _conversation(spec, engine)
    budget = spec.params.max_tokens
    used_in = used_out = used_thinking = used_cached = calls = index = 0

    def finished(status: Literal["completed", "incomplete"], reason: str | None = None) -> Finished:
        return Finished(status, used_in, used_out, reason, used_thinking, used_cached)

    while True:
        allow_code, must_code = _code_mode(spec, calls)
        remaining = None if budget is None else budget - used_out
        if remaining is not None and remaining <= 0:
            yield finished("incomplete", "max_output_tokens")
            return
        turn = Turn(tuple(conversation), spec.format, replace(spec.params, max_tokens=remaining), spec.tools,
                    spec.reasoning)
        if first is not None:
            prepared, first = first, None
        else:  # off the event loop: rendering, tokenizing and cutting pictures into tiles can take a while
            prepared = await engine.prepare_async(turn, allow_code, must_code, continuing=calls > 0)
        split = _Split(engine.profile.code)
        call_items: _CallItems | None = None  # set when the turn is function calls, after any reasoning item
        item: CodeCallItem | MessageItem | None = None
        thought: ReasoningItem | None = None  # the turn's reasoning item, while it streams
        thought_text = ""
        done: Done | None = None
        async for event in generate(prepared):
            if isinstance(event, Done):
                done = event
                continue
            if isinstance(event, ReasoningDelta):
                if thought is None:
                    thought = ReasoningItem(_new_id("rs"))
                    yield ItemAdded(index, thought)
                thought_text += event.text
                yield Delta(index, "reasoning", event.text)
                continue
            if thought is not None:  # the answer begins: the thoughts are complete
                yield ItemDone(index, replace(thought, text=thought_text, status="completed"))
                thought, index = None, index + 1
            piece = split.push(event.text, event.branch)
            if split.kind == "calls":
                call_items = call_items or _CallItems(index)
                for call_event in call_items.push(event.text):
                    yield call_event
                continue
            if item is None and split.kind in ("code", "text"):
                item = CodeCallItem(_new_id("ci")) if split.kind == "code" else MessageItem(_new_id("msg"))
                yield ItemAdded(index, item)
            if piece:
                yield Delta(index, "code" if split.kind == "code" else "text", piece)
        assert done is not None
        used_in += done.stats.prompt_tokens
        used_out += done.stats.completion_tokens
        used_thinking += done.stats.reasoning_tokens
        used_cached += done.stats.cached_tokens
        if thought is not None:  # the turn ended while thinking: cut by the token budget
            yield ItemDone(index, replace(thought, text=thought_text, status="incomplete"))
            yield finished("incomplete", "max_output_tokens")
            return
        cut = done.finish_reason == "length"
        if split.kind == "calls":
            for call_event in (call_items or _CallItems(index)).finish():
                yield call_event
            yield finished("incomplete", "max_output_tokens") if cut else finished("completed")
            return
        if item is None:  # the model ended at once: an empty answer
            split.kind = "text"
            item = MessageItem(_new_id("msg"))
            yield ItemAdded(index, item)
        tail = split.rest()
        if tail:
            yield Delta(index, "code" if split.kind == "code" else "text", tail)
        status: Literal["completed", "incomplete"] = "incomplete" if cut else "completed"
        if isinstance(item, MessageItem):
            yield ItemDone(index, replace(item, text=split.body(final=True), status=status))
            yield finished(status, "max_output_tokens" if cut else None)
            return
        code = split.body(final=True)
        if cut:
            yield ItemDone(index, replace(item, code=code, status="incomplete"))
            yield finished("incomplete", "max_output_tokens")
            return
        yield Interpreting(index)
        container_id, result = await execute(code)
        calls += 1
        yield ItemDone(index, replace(item, code=code, container_id=container_id, status="completed", result=result))
        conversation += [Message("assistant", split.raw), observation(result, engine.sees)]
        index += 1


def _with_instructions(messages: list[Message], instructions: str) -> list[Message]:
    if messages and messages[0].role == "system":
        return [Message("system", f"{messages[0].content}\n\n{instructions}"), *messages[1:]]
    return [Message("system", instructions), *messages]


def logs_text(result: Execution) -> str:
    parts = [result.logs.rstrip("\n")] if result.logs.strip() else []
    if result.result is not None:
        parts.append(result.result)
    if result.error is not None:
        parts.append(result.error.traceback or f"{result.error.name}: {result.error.value}")
        if result.state_lost:
            parts.append(result.error.value)
    return "\n".join(parts)


def context_messages(output: list[Item], code: CodeFormat, sees: bool = False) -> list[Message]:
    """A response's output as the conversation a follow-up continues (previous_response_id), as the model saw
    it: each code call and its observation, each complete function call, each answer (a call cut by the token
    budget never ran). `sees`: the model was shown the figures."""
    messages: list[Message] = []
    for item in output:
        if isinstance(item, CodeCallItem) and item.status == "completed" and item.result is not None:
            messages += [Message("assistant", code.wrap(item.code)), observation(item.result, sees)]
        elif isinstance(item, FunctionCallItem) and item.status != "incomplete":  # a cut call has no result
            messages.append(Message("assistant", "", (ToolCall(item.call_id, item.name, item.arguments),)))
        elif isinstance(item, MessageItem):
            messages.append(Message("assistant", item.text))
    return messages


def observation(result: Execution, sees: bool = False) -> Message:
    """The code's output as the model's next user turn; a model that can see also gets the figures."""
    text = logs_text(result) or ("(no output)" if not result.images else "")
    if len(text) > OBSERVATION_CHARS:
        half = OBSERVATION_CHARS // 2
        text = f"{text[:half]}\n[... output truncated ...]\n{text[-half:]}"
    if result.images and not sees:
        text += f"\n[{len(result.images)} figure(s) drawn; this model cannot see them]"
    parts: list[Part] = [f"Output of the code:\n{text}".rstrip()]
    if sees:
        parts += [Image(png) for png in result.images]
    return Message.of("user", parts)
