"""OpenAI Responses request parsing: input items, tools and text format -> runner values."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, TypeAdapter, ValidationError

from smolrun import media
from smolrun.api.wire import MAX_MESSAGES, NAME, DryFields, WireModel, choose_tools, refuse_null, wire_param
from smolrun.constraints import check_schema
from smolrun.errors import InvalidRequest, SchemaError
from smolrun.prompt.profiles import FENCE, CodeFormat
from smolrun.runner import CodeCallItem, FunctionCallItem, Item, ReasoningItem, logs_text
from smolrun.sandbox.container import Execution
from smolrun.turn import EFFORTS, TEXT, Message, Part, Reasoning, ResponseFormat, Role, Tool, ToolCall, ToolUse

INCLUDE_OUTPUTS = "code_interpreter_call.outputs"
INCLUDE_LOGPROBS = "message.output_text.logprobs"
T = TypeVar("T")


class _FormatText(WireModel):
    type: Literal["text"]


class _FormatJsonObject(WireModel):
    type: Literal["json_object"]


class _FormatJsonSchema(WireModel):
    type: Literal["json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class _TextParam(WireModel):
    format: Annotated[_FormatText | _FormatJsonObject | _FormatJsonSchema, Field(discriminator="type")] | None = None


class _FunctionChoice(WireModel):
    type: Literal["function"]
    name: str


class _CodeChoice(WireModel):
    type: Literal["code_interpreter"]


class _LogsOutput(WireModel):
    type: Literal["logs"]
    logs: str


class _ImageOutput(WireModel):
    type: Literal["image"]
    url: str | None = None


class _CodeCallItem(WireModel):
    code: str | None = None
    outputs: list[Annotated[_LogsOutput | _ImageOutput, Field(discriminator="type")]] | None = None


_TEXT = TypeAdapter(_TextParam | None)
_CHOICE = TypeAdapter(Literal["none", "auto", "required"] | _FunctionChoice | _CodeChoice | None)
_CODE_CALL = TypeAdapter(_CodeCallItem)


def checked(adapter: TypeAdapter[T], value: Any, param: str, expected: str | None = None) -> T:
    """`value` validated by pydantic; the first problem is a 400 naming the parameter (or, for a union whose
    members pydantic would each report, what is `expected`)."""
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        if expected is not None:
            raise InvalidRequest(f"Invalid value for '{param}': expected {expected}", param=param) from None
        first = exc.errors()[0]
        inner = wire_param(tuple(first.get("loc", ())))
        where = param if inner is None else param + (inner if inner.startswith("[") else f".{inner}")
        raise InvalidRequest(f"Invalid value at '{where}': {first.get('msg', 'malformed')}", param=where) from None
ROLES: dict[str, Role] = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


class ResponsesRequest(DryFields):
    model: str
    input: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_MESSAGES)]
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
    reasoning: dict[str, Any] | None = None  # {"effort", "summary"}; no effect on models that do not think
    # Extensions (send with the SDK's extra_body): Chat Completions' penalties, which help tiny models end,
    # vLLM's thinking budget, and the DRY penalty (DryFields).
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    thinking_token_budget: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    _not_null = refuse_null("text", "tools", "tool_choice")

    def refuse_logprobs(self) -> None:
        """Logprobs are not carried through the Responses runner yet: a 400 rather than an empty list."""
        if INCLUDE_LOGPROBS in (self.include or []) or self.top_logprobs:
            raise InvalidRequest("logprobs are not available on the Responses API yet; Chat Completions (logprobs, "
                                 "top_logprobs) and /v1/completions have them",
                                 param="include" if self.top_logprobs is None else "top_logprobs")

    def has_pictures(self) -> bool:
        """Whether the input has input_image parts (input_file parts may hold pictures too: the route looks)."""
        return not isinstance(self.input, str) and any(
            isinstance(part, dict) and part.get("type") == "input_image"
            for item in self.input if isinstance(item.get("content"), list) for part in item["content"])

    def parsed_reasoning(self) -> tuple[Reasoning, str | None]:
        """The thinking effort and budget, and the summary asked for (None: no summary)."""
        raw = self.reasoning or {}
        effort, summary = raw.get("effort"), raw.get("summary") or raw.get("generate_summary")
        if effort is not None and effort not in EFFORTS:
            raise InvalidRequest(f"Invalid value for 'reasoning.effort': {effort!r}; supported values are "
                                 + ", ".join(repr(e) for e in EFFORTS), param="reasoning.effort")
        if summary not in (None, "auto", "concise", "detailed"):
            raise InvalidRequest(f"Invalid value for 'reasoning.summary': {summary!r}; supported values are "
                                 "'auto', 'concise' and 'detailed'", param="reasoning.summary")
        return Reasoning(effort, self.thinking_token_budget), summary


@dataclass(frozen=True)
class CodeTool:
    container: str | None  # an existing container's id, or None for auto mode
    file_ids: tuple[str, ...] = ()
    memory_limit: str = "1g"
    required: bool = False  # tool_choice "required" or {"type": "code_interpreter"}: run code at least once


@dataclass(frozen=True)
class ParsedInput:
    messages: tuple[Message, ...]
    file_ids: tuple[str, ...]  # input_file parts: copied into the container, or inlined without one
    items: tuple[dict[str, Any], ...]  # the input items with ids, for GET .../input_items


def parse_format(text: dict[str, Any] | None) -> ResponseFormat:
    param = checked(_TEXT, text, "text")
    fmt = param.format if param is not None else None
    if fmt is None or isinstance(fmt, _FormatText):
        return TEXT
    if isinstance(fmt, _FormatJsonObject):
        return ResponseFormat("json_object", name="json_object")
    name = fmt.name or "response"
    strict = bool(fmt.strict)
    try:
        schema = check_schema(fmt.schema_ or {}, strict=strict, what=f"text.format {name!r}")
    except SchemaError as exc:
        raise SchemaError(exc.message, param="text.format.schema") from exc
    return ResponseFormat("json_schema", schema, name, strict)


def parse_tools(tools: list[dict[str, Any]], choice: Any,
                parallel: bool | None) -> tuple[CodeTool | None, ToolUse]:
    code: CodeTool | None = None
    functions: list[Tool] = []
    for i, tool in enumerate(tools):
        if tool.get("type") == "function":
            functions.append(_function(tool, i, {f.name for f in functions}))
            continue
        if tool.get("type") != "code_interpreter":
            raise InvalidRequest(f"tools of type {tool.get('type')!r} are not supported; this server offers "
                                 "'function' and 'code_interpreter'", param=f"tools[{i}]")
        container = tool.get("container", {"type": "auto"})
        if isinstance(container, str):
            code = CodeTool(container)
        elif isinstance(container, dict) and container.get("type") == "auto":
            code = CodeTool(None, tuple(container.get("file_ids") or ()), container.get("memory_limit") or "1g")
        else:
            raise InvalidRequest("'container' must be a container id or {\"type\": \"auto\"}",
                                 param=f"tools[{i}].container")
    parsed = checked(_CHOICE, choice, "tool_choice",
                     "'none', 'auto', 'required', {\"type\": \"function\", \"name\": \"...\"} or "
                     "{\"type\": \"code_interpreter\"}")
    if isinstance(parsed, _CodeChoice) or (parsed == "required" and code is not None and not functions):
        if code is None:
            raise InvalidRequest("tool_choice {\"type\": \"code_interpreter\"} needs the code_interpreter tool",
                                 param="tool_choice")
        # "Run code at least once", as at OpenAI: the first model turn must be a code call.
        return replace(code, required=True), ToolUse(tuple(functions), "none" if isinstance(parsed, _CodeChoice)
                                                     else "auto", parallel is not False)
    mode = choose_tools(parsed if isinstance(parsed, str) else None,
                        parsed.name if isinstance(parsed, _FunctionChoice) else None, [f.name for f in functions])
    return code, ToolUse(tuple(functions), mode, parallel is not False)


def _function(tool: dict[str, Any], i: int, taken: set[str]) -> Tool:
    name = tool.get("name")
    if not isinstance(name, str) or not NAME.match(name) or name in taken:
        raise InvalidRequest("function names are unique, 1-64 characters of a-z, A-Z, 0-9, _ and -",
                             param=f"tools[{i}].name")
    raw = tool.get("parameters")
    schema = raw if raw is not None else {"type": "object", "properties": {}, "additionalProperties": False}
    given = tool.get("strict")
    # Strict by default in the Responses API. Left unsaid, a schema outside strict mode's rules (langchain's
    # bind_tools sends such) is taken as not strict: its arguments still follow it, as every schema's do here.
    strict = given is not False
    try:
        try:
            parameters = check_schema(schema, strict=strict, what=f"function '{name}'")
        except SchemaError:
            if given is not None:
                raise
            strict = False
            parameters = check_schema(schema, strict=False, what=f"function '{name}'")
    except SchemaError as exc:
        raise SchemaError(exc.message, param=f"tools[{i}].parameters", code="invalid_function_parameters") from exc
    return Tool(name, parameters, str(tool.get("description") or ""), strict)


def parse_input(raw: str | list[dict[str, Any]], code: CodeFormat = FENCE,
                files: media.Files | None = None) -> ParsedInput:
    """Input items as messages; replayed code calls are written in the model's code format; input_image parts
    are read (data URLs, or uploaded files through `files`)."""
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
            parts, ids = _content(item.get("content"), i, files)
            file_ids += ids
            messages.append(media.message(role, parts, f"input[{i}].content"))
        elif kind == "code_interpreter_call":
            messages += replay_code_call(item, code, f"input[{i}]")
        elif kind == "function_call":
            messages.append(replay_function_call(item, i))
        elif kind == "reasoning":
            pass  # past thoughts are not shown to the model again, as chat templates drop them
        elif kind == "function_call_output":
            output, call_id = item.get("output"), item.get("call_id")
            if not isinstance(call_id, str) or not isinstance(output, str):
                raise InvalidRequest("function_call_output needs 'call_id' and a string 'output'",
                                     param=f"input[{i}]")
            messages.append(Message("tool", output, tool_call_id=call_id))
        else:
            raise InvalidRequest(f"input items of type {kind!r} are not supported yet", param=f"input[{i}]")
        items.append({"id": item.get("id") or f"msg_{uuid.uuid4().hex}", **item, "type": kind})
    return ParsedInput(tuple(messages), tuple(file_ids), tuple(items))


def _content(content: Any, i: int, files: media.Files | None) -> tuple[list[Part], list[str]]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise InvalidRequest("message content must be a string or a list of parts", param=f"input[{i}].content")
    parts: list[Part] = []
    file_ids: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"input[{i}].content[{j}]"
        if kind in ("input_text", "output_text"):
            parts.append(str(part.get("text", "")))
        elif kind == "input_file" and isinstance(part.get("file_id"), str):
            file_ids.append(part["file_id"])
        elif kind == "input_image":
            detail = media.check_detail(part.get("detail"), f"{where}.detail")
            parts += media.load(_image_bytes(part, files, where), where, detail)
        else:
            raise InvalidRequest(f"content parts of type {kind!r} are not supported (input_text, input_image, "
                                 "and input_file by file_id)", param=where)
    return parts, file_ids


def _image_bytes(part: dict[str, Any], files: media.Files | None, where: str) -> bytes:
    if isinstance(part.get("image_url"), str):
        return media.decode_url(part["image_url"], f"{where}.image_url")
    if isinstance(part.get("file_id"), str) and files is not None:
        return files(part["file_id"])
    raise InvalidRequest("input_image needs 'image_url' (a data URL) or 'file_id'", param=where)


def replay_code_call(item: dict[str, Any], code: CodeFormat = FENCE, where: str = "input") -> list[Message]:
    """A past code call, as the model saw it: its code, then the output it got back."""
    call = checked(_CODE_CALL, item, where)
    logs = "\n".join(o.logs for o in call.outputs or () if isinstance(o, _LogsOutput))
    return [Message("assistant", code.wrap(call.code or "")),
            Message("user", f"Output of the code:\n{logs or '(no output)'}")]


def replay_function_call(item: dict[str, Any], i: int = 0) -> Message:
    try:
        json.loads(item["arguments"])
        call = ToolCall(item["call_id"], item["name"], item["arguments"])
    except (KeyError, TypeError, ValueError):
        raise InvalidRequest("function_call needs 'call_id', 'name' and JSON 'arguments'",
                             param=f"input[{i}]") from None
    return Message("assistant", "", (call,))


def wire_item(item: Item, include_outputs: bool, summary: bool, annotations: list[dict[str, Any]]) -> dict[str, Any]:
    """A runner item in OpenAI's shape. `include_outputs`: code outputs are shown (include asks for them);
    `summary`: a finished reasoning item's text is also its summary; `annotations`: a message's citations."""
    if isinstance(item, ReasoningItem):
        summaries = [{"type": "summary_text", "text": item.text}] if summary and item.status != "in_progress" else []
        return {"id": item.id, "type": "reasoning", "summary": summaries,
                "content": [{"type": "reasoning_text", "text": item.text}], "status": item.status}
    if isinstance(item, CodeCallItem):
        outputs = _outputs(item.result) if include_outputs and item.result is not None else None
        return {"id": item.id, "type": "code_interpreter_call", "code": item.code, "container_id": item.container_id,
                "status": item.status, "outputs": outputs}
    if isinstance(item, FunctionCallItem):
        return {"id": item.id, "type": "function_call", "call_id": item.call_id, "name": item.name,
                "arguments": item.arguments, "status": item.status}
    content = [] if item.status == "in_progress" else [
        {"type": "output_text", "text": item.text, "annotations": annotations, "logprobs": []}]
    return {"id": item.id, "type": "message", "role": "assistant", "status": item.status, "content": content}


def _outputs(result: Execution) -> list[dict[str, Any]]:
    outputs: list[dict[str, Any]] = [{"type": "logs", "logs": logs_text(result)}]
    outputs += [{"type": "image", "url": f"data:image/png;base64,{base64.b64encode(png).decode()}"}
                for png in result.images]
    return outputs
