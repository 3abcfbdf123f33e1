"""Function calling in a model's text: tool descriptions for the prompt, history rendering, output parsing.

The format is the one SmolLM3 and Hermes-style models use: `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>`, results in `<tool_response>` blocks. Models whose own template has no tool support (SmolLM2)
get the tools described in a system note.
"""

from __future__ import annotations

import json
import re
import uuid

from smolrun.turn import Message, ToolCall, ToolUse

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)


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


def parse_calls(text: str) -> tuple[ToolCall, ...]:
    """The calls in a model turn that the grammar made a sequence of complete tool calls."""
    calls = []
    for body in _CALL.findall(text):
        data = json.loads(body)
        calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", data["name"],
                              json.dumps(data["arguments"], ensure_ascii=False, separators=(",", ":"))))
    return tuple(calls)
