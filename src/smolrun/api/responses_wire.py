"""OpenAI Responses request parsing: input items, tools and text format -> runner values."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from smolrun.constraints import check_schema
from smolrun.errors import InvalidRequest, SchemaError
from smolrun.turn import TEXT, Message, ResponseFormat, Role

INCLUDE_OUTPUTS = "code_interpreter_call.outputs"
ROLES: dict[str, Role] = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] = []
    tool_choice: Any = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tool_calls: int | None = Field(default=None, ge=0)
    include: list[str] | None = None
    store: bool | None = True
    previous_response_id: str | None = None
    stream: bool | None = False
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: dict[str, Any] | None = None  # accepted; SmolLM2 has no thinking mode


@dataclass(frozen=True)
class CodeTool:
    container: str | None  # an existing container's id, or None for auto mode
    file_ids: tuple[str, ...] = ()
    memory_limit: str = "1g"


@dataclass(frozen=True)
class ParsedInput:
    messages: tuple[Message, ...]
    file_ids: tuple[str, ...]  # input_file parts: copied into the container, or inlined without one
    items: tuple[dict[str, Any], ...]  # the input items with ids, for GET .../input_items


def parse_format(text: dict[str, Any] | None) -> ResponseFormat:
    fmt = (text or {}).get("format") or {"type": "text"}
    kind = fmt.get("type")
    if kind == "text":
        return TEXT
    if kind == "json_object":
        return ResponseFormat("json_object", name="json_object")
    if kind == "json_schema":
        name = fmt.get("name") or "response"
        strict = bool(fmt.get("strict"))
        try:
            schema = check_schema(fmt.get("schema") or {}, strict=strict, what=f"text.format {name!r}")
        except SchemaError as exc:
            raise SchemaError(exc.message, param="text.format.schema") from exc
        return ResponseFormat("json_schema", schema, name, strict)
    raise InvalidRequest(f"unsupported text.format type {kind!r}", param="text.format.type")


def parse_tools(tools: list[dict[str, Any]]) -> CodeTool | None:
    code: CodeTool | None = None
    for i, tool in enumerate(tools):
        if tool.get("type") != "code_interpreter":
            raise InvalidRequest(f"tools of type {tool.get('type')!r} are not supported yet; "
                                 "this server offers 'code_interpreter'", param=f"tools[{i}]")
        container = tool.get("container", {"type": "auto"})
        if isinstance(container, str):
            code = CodeTool(container)
        elif isinstance(container, dict) and container.get("type") == "auto":
            code = CodeTool(None, tuple(container.get("file_ids") or ()), container.get("memory_limit") or "1g")
        else:
            raise InvalidRequest("'container' must be a container id or {\"type\": \"auto\"}",
                                 param=f"tools[{i}].container")
    return code


def parse_input(raw: str | list[dict[str, Any]]) -> ParsedInput:
    if isinstance(raw, str):
        item = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": raw}]}
        return ParsedInput((Message("user", raw),), (), (item,))
    messages: list[Message] = []
    file_ids: list[str] = []
    items: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        kind = item.get("type", "message")
        if kind == "message":
            role = ROLES.get(str(item.get("role")))
            if role is None:
                raise InvalidRequest(f"unsupported role {item.get('role')!r}", param=f"input[{i}].role")
            text, files = _content(item.get("content"), i)
            file_ids += files
            messages.append(Message(role, text))
        elif kind == "code_interpreter_call":
            messages += replay_code_call(item)
        else:
            raise InvalidRequest(f"input items of type {kind!r} are not supported yet", param=f"input[{i}]")
        items.append({"id": item.get("id") or f"msg_{uuid.uuid4().hex}", **item, "type": kind})
    return ParsedInput(tuple(messages), tuple(file_ids), tuple(items))


def _content(content: Any, i: int) -> tuple[str, list[str]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise InvalidRequest("message content must be a string or a list of parts", param=f"input[{i}].content")
    texts: list[str] = []
    files: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            texts.append(str(part.get("text", "")))
        elif kind == "input_file" and isinstance(part.get("file_id"), str):
            files.append(part["file_id"])
        else:
            raise InvalidRequest(f"content parts of type {kind!r} are not supported by this model "
                                 "(input_text, and input_file by file_id)", param=f"input[{i}].content[{j}]")
    return "\n".join(texts), files


def replay_code_call(item: dict[str, Any]) -> list[Message]:
    """A past code call, as the model saw it: its fenced code, then the output it got back."""
    logs = "\n".join(o.get("logs", "") for o in item.get("outputs") or [] if o.get("type") == "logs")
    return [Message("assistant", f"```python\n{item.get('code') or ''}\n```"),
            Message("user", f"Output of the code:\n{logs or '(no output)'}")]


def output_messages(output: list[dict[str, Any]]) -> list[Message]:
    """A stored response's output as conversation turns, for previous_response_id."""
    messages: list[Message] = []
    for item in output:
        if item["type"] == "code_interpreter_call":
            messages += replay_code_call(item)
        elif item["type"] == "message":
            messages.append(Message("assistant", "".join(p.get("text", "") for p in item["content"])))
    return messages

