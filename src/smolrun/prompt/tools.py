"""Function calling in a model's text: tool descriptions for the prompt, history rendering, output parsing.

The format is the one SmolLM3 and Hermes-style models use: `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>`, results in `<tool_response>` blocks. Models whose own template has no tool support (SmolLM2)
get the tools described in a system note.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from smolrun.turn import Message, ToolCall, ToolUse

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# A call's JSON as the grammar writes it: compact, "name" first (a constant), then "arguments".
_HEAD = re.compile(r'\{"name":("(?:[^"\\]|\\.)*"),"arguments":')
_JSON = json.JSONDecoder()


def describe(tools: ToolUse) -> str:
    specs = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": t.parameters}} for t in tools.active]
    lines = ["You can call these functions:", *(json.dumps(s) for s in specs),
             f'To call a function, reply with {OPEN}{{"name": <function name>, "arguments": <arguments object>}}'
             f"{CLOSE} and nothing else; you will get its result."]
    if tools.choice == "auto":
        lines.append("If no function is needed, answer directly.")
    return "\n".join(lines)


def render_history(messages: tuple[Message, ...], tools: ToolUse, describe_tools: bool = True) -> tuple[Message, ...]:
    """Messages as any template can render them: calls and results as text (templates that list tools still
    drop `tool_calls`); the tools described in a system note unless the template lists them itself."""
    out: list[Message] = []
    for m in messages:
        if m.tool_calls:
            calls = "\n".join(f"{OPEN}{json.dumps({'name': c.name, 'arguments': json.loads(c.arguments)})}{CLOSE}"
                              for c in m.tool_calls)
            out.append(Message("assistant", f"{m.content}\n{calls}".strip()))
        elif m.role == "tool":
            out.append(Message("user", f"<tool_response>\n{m.content}\n</tool_response>"))
        else:
            out.append(m)
    if tools.active and describe_tools:
        note = describe(tools)
        if out and out[0].role == "system":
            out[0] = Message("system", f"{out[0].content}\n\n{note}")
        else:
            out.insert(0, Message("system", note))
    return tuple(out)


@dataclass(frozen=True)
class Calls:
    """A turn of function calls read from its text: the complete ones, and the last one if it is cut short
    (max_tokens): its name, and its arguments so far, a prefix of their JSON text."""

    complete: tuple[ToolCall, ...]
    partial: ToolCall | None = None

    @property
    def all(self) -> tuple[ToolCall, ...]:
        return self.complete if self.partial is None else (*self.complete, self.partial)


def read_calls(text: str, ids: tuple[str, ...] = ()) -> Calls:
    """The calls in a turn the grammar made of tool calls, read by the structure the grammar gave them (tags,
    then JSON whose extent the JSON itself tells), so a string holding a closing tag is only a string. `ids`
    are the ids of calls already announced (streaming), kept in order; new calls get new ones."""
    complete: list[ToolCall] = []
    at = 0
    while True:
        at = _skip_newlines(text, at)
        if not text.startswith(OPEN, at):
            return Calls(tuple(complete))
        head = _HEAD.match(text, _skip_newlines(text, at + len(OPEN)))
        if head is None:  # cut before its name was whole
            return Calls(tuple(complete))
        call_id = ids[len(complete)] if len(complete) < len(ids) else f"call_{uuid.uuid4().hex[:24]}"
        name = json.loads(head.group(1))
        try:
            _, end = _JSON.raw_decode(text, head.end())
        except json.JSONDecodeError:
            return Calls(tuple(complete), ToolCall(call_id, name, text[head.end():]))
        call = ToolCall(call_id, name, text[head.end():end])
        after = _skip_newlines(text, end + 1) if text.startswith("}", end) else -1
        if after < 0 or not text.startswith(CLOSE, after):  # its JSON is whole, its closing tag not yet
            return Calls(tuple(complete), call)
        complete.append(call)
        at = after + len(CLOSE)


@dataclass(frozen=True)
class CallProgress:
    """What one push added to one call: `new` when the call first shows (its name is whole), and the piece
    of its arguments not given before."""

    index: int
    call: ToolCall
    new: bool
    arguments: str


class CallReader:
    """A turn of function calls read as its text streams in (both APIs stream calls this way): each push
    says which calls appeared and how far each one's arguments grew; `calls` is all of it so far."""

    def __init__(self) -> None:
        self.text = ""
        self.calls = Calls(())
        self._sent: list[int] = []  # characters of each call's arguments already given

    def push(self, text: str) -> list[CallProgress]:
        self.text += text
        self.calls = read_calls(self.text, tuple(c.id for c in self.calls.all))
        progress = []
        for index, call in enumerate(self.calls.all):
            new = index == len(self._sent)
            if new:
                self._sent.append(0)
            piece = call.arguments[self._sent[index]:]
            self._sent[index] = len(call.arguments)
            if new or piece:
                progress.append(CallProgress(index, call, new, piece))
        return progress


def _skip_newlines(text: str, at: int) -> int:
    while text.startswith("\n", at):
        at += 1
    return at
