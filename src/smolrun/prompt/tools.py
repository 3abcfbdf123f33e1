"""Function calling in a model's text: tool descriptions for the prompt, history rendering, output parsing.

The format is the one SmolLM3 and Hermes-style models use: `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>`, results in `<tool_response>` blocks. Models whose own template has no tool support (SmolLM2)
get the tools described in a system note.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, replace

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
    says which calls appeared and how far each one's arguments grew; `calls` is all of it so far.

    Each push reads only what is new: calls already complete are not read again, and the current call's
    arguments are scanned once, character by character, for the end of their JSON (read_calls over the
    whole text on every delta would be quadratic in the turn's length)."""

    def __init__(self) -> None:
        self.text = ""
        self.calls = Calls(())
        self._complete: list[ToolCall] = []
        self._at = 0  # where the text after the last complete call begins
        self._call: ToolCall | None = None  # the current call, once its name is whole
        self._start = 0  # where its arguments begin
        self._scan = _Extent()
        self._sent: list[int] = []  # characters of each call's arguments already given

    def push(self, text: str) -> list[CallProgress]:
        self.text += text
        while self._advance():
            pass
        partial = None
        if self._call is not None:
            end = self._scan.end if self._scan.end is not None else len(self.text)
            partial = replace(self._call, arguments=self.text[self._start:end])
        self.calls = Calls(tuple(self._complete), partial)
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

    def _advance(self) -> bool:
        """One step through the new text: a call's head read, its arguments' end found, or the call closed.
        False when the text so far does not go further."""
        text = self.text
        if self._call is None:
            at = _skip_newlines(text, self._at)
            if not text.startswith(OPEN, at):
                return False
            head = _HEAD.match(text, _skip_newlines(text, at + len(OPEN)))
            if head is None:  # its name is not whole yet
                return False
            self._call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", json.loads(head.group(1)), "")
            self._start, self._scan = head.end(), _Extent(head.end())
            return True
        end = self._scan.end
        if end is None:
            return self._scan.feed(text) is not None
        after = _skip_newlines(text, end + 1) if text.startswith("}", end) else -1
        if after < 0 or not text.startswith(CLOSE, after):  # its JSON is whole, its closing tag not yet
            return False
        self._complete.append(replace(self._call, arguments=text[self._start:end]))
        self._call, self._at = None, after + len(CLOSE)
        return True


class _Extent:
    """Where a JSON value that starts at `start` ends, found by reading each character once (strings,
    escapes and nesting followed); `end` is set once the value is whole."""

    def __init__(self, start: int = 0) -> None:
        self.at = start
        self.depth = 0
        self.string = self.escape = False
        self.end: int | None = None

    def feed(self, text: str) -> int | None:
        i = self.at
        while i < len(text):
            c = text[i]
            i += 1
            if self.string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.string = False
                    if self.depth == 0:  # a string value
                        self.end = i
                        break
            elif c == '"':
                self.string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.end = i
                    break
            elif self.depth == 0 and c not in " \n":  # a number or a literal: whole when what follows ends it
                return self._scalar(text)
        self.at = i
        return self.end

    def _scalar(self, text: str) -> int | None:
        try:
            _, end = _JSON.raw_decode(text, self.at)
        except json.JSONDecodeError:
            return None
        if end < len(text):  # "12" may still grow into "123"; a character after it says it is whole
            self.end = end
        return self.end


def _skip_newlines(text: str, at: int) -> int:
    while text.startswith("\n", at):
        at += 1
    return at
