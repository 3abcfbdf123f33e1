"""OpenAI Chat Completions wire models (pydantic, at the HTTP edge only) and their mapping to a Turn."""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from smolrun import media
from smolrun.constraints import check_schema
from smolrun.errors import InvalidRequest, SchemaError
from smolrun.turn import (
    TEXT,
    Effort,
    Message,
    Part,
    Reasoning,
    ResponseFormat,
    SamplingParams,
    Tool,
    ToolCall,
    ToolUse,
    Turn,
)

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # function and json_schema names, in both APIs
MAX_MESSAGES = 2048  # messages (Chat) or input items (Responses) in one request
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})  # pydantic's names of members


def sampling(max_tokens: int | None, temperature: float | None, top_p: float | None,
             frequency_penalty: float | None, presence_penalty: float | None, *, top_k: int | None = None,
             seed: int | None = None, stop: tuple[str, ...] = (), dry: DryFields | None = None) -> SamplingParams:
    """Sampling parameters as both APIs take them: None is OpenAI's default (temperature 1, top_p 1, no
    penalties, no top-k cut); a seed anywhere in OpenAI's int64 range (the engines take non-negative ones);
    the DRY penalty's fields where the request set them (else the server's)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
                            top_p=1.0 if top_p is None else top_p, top_k=top_k or 0,
                            seed=None if seed is None else seed % 2**63, stop=stop,
                            frequency_penalty=frequency_penalty or 0.0, presence_penalty=presence_penalty or 0.0)
    if dry is None:
        return params
    return replace(params, dry_multiplier=dry.dry_multiplier,
                   dry_base=params.dry_base if dry.dry_base is None else dry.dry_base,
                   dry_allowed_length=dry.dry_allowed_length or params.dry_allowed_length)


def choose_tools(choice: str | None, named: str | None, functions: Collection[str]) -> str:
    """A turn's tool mode from either API's tool_choice: a mode ("none", "auto", "required", None for the
    default) or the name of one function (`named`)."""
    if named is not None:
        if named not in functions:
            raise InvalidRequest(f"tool_choice names no function of 'tools': {named!r}", param="tool_choice")
        return named
    if choice is None or choice == "auto":
        return "auto" if functions else "none"
    if choice == "required" and not functions:
        raise InvalidRequest("tool_choice 'required' needs tools", param="tool_choice")
    return choice


def wire_param(loc: tuple[int | str, ...]) -> str | None:
    """A pydantic error location as OpenAI names parameters (`messages[0].content`), up to where pydantic adds
    the name of a union's member (`literal['none','auto']`, a class name), which is no parameter."""
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p != "body" or parts:
            if not re.fullmatch(r"[a-z_$][a-z0-9_]*", p) or p in _UNION_TAGS:
                break
            parts.append(f".{p}" if parts else p)
    return "".join(parts) or None


class WireModel(BaseModel):
    # OpenAI adds optional fields often; unknown ones are accepted and ignored like the real API does. A request
    # is a value once parsed: nothing along the way changes it. Types are strict, as OpenAI checks them: `true` is
    # no number, "123" no integer (an integer is a number, though).
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class DryFields(WireModel):
    """Extension of both APIs (the names are llama.cpp server's; OpenAI's SDK sends them through `extra_body`):
    the DRY repetition penalty, which ends the loops a small model falls into inside a JSON string. Left out,
    the server's default holds: on inside JSON answers (`smolrun serve --dry-multiplier`), off for free text,
    function calls and code. `dry_multiplier` 0 turns it off."""

    dry_multiplier: float | None = Field(default=None, ge=0, le=10)
    dry_base: float | None = Field(default=None, ge=1, le=4)
    dry_allowed_length: int | None = Field(default=None, ge=1, le=64)


def refuse_null(*fields: str) -> Any:
    """A validator for parameters OpenAI's spec does not mark nullable: left out they take their default, but
    an explicit null is a 400 naming the parameter."""

    def check(cls: type, value: Any) -> Any:
        if value is None:
            raise ValueError("null is not allowed; leave the parameter out instead")
        return value

    return field_validator(*fields, mode="before")(classmethod(check))


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class ImageUrl(WireModel):
    url: str
    detail: str | None = None


class ImagePart(WireModel):
    type: Literal["image_url"]
    image_url: ImageUrl


class FileRef(WireModel):
    file_id: str | None = None
    file_data: str | None = None  # a data URL, or bare base64
    filename: str | None = None


class FilePart(WireModel):
    type: Literal["file"]
    file: FileRef


class OtherPart(WireModel):
    type: Literal["input_audio", "refusal"]


ContentPart = Annotated[TextPart | ImagePart | FilePart | OtherPart, Field(discriminator="type")]


class FunctionCall(WireModel):
    name: str
    arguments: str


class ToolCallWire(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallWire] | None = None
    tool_call_id: str | None = None


class FunctionSpec(WireModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(WireModel):
    type: Literal["function"]
    function: FunctionSpec


class JsonSchemaSpec(WireModel):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(WireModel):
    type: Literal["text"]


class JsonObjectFormat(WireModel):
    type: Literal["json_object"]


class JsonSchemaFormat(WireModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


AnyFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class NamedFunction(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(WireModel):
    include_usage: bool = False


class ChatCompletionRequest(DryFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    response_format: AnyFormat | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # extension, as in vLLM and llama.cpp
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # OpenAI's int64
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Effort | None = None  # no effect on models without a thinking mode
    thinking_token_budget: int | None = Field(default=None, ge=1)  # extension, as in vLLM
    _not_null = refuse_null("response_format", "tools", "tool_choice", "parallel_tool_calls")

    def has_pictures(self) -> bool:
        return any(isinstance(p, ImagePart | FilePart) for m in self.messages if isinstance(m.content, list)
                   for p in m.content)

    def to_turn(self, files: media.Files | None = None) -> Turn:
        """The request as a Turn; pictures are read (from data URLs, or uploaded files through `files`)."""
        self._refuse_unsupported()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > 4:
            raise InvalidRequest("'stop' accepts at most 4 sequences", param="stop")
        params = sampling(self.max_completion_tokens or self.max_tokens, self.temperature, self.top_p,
                          self.frequency_penalty, self.presence_penalty, top_k=self.top_k, seed=self.seed,
                          stop=stop, dry=self)
        if self.logprobs:
            params = replace(params, logprobs=self.top_logprobs or 0)
        messages = tuple(_message(m, i, files) for i, m in enumerate(self.messages))
        functions = _tools(self.tools or [])
        choice = self.tool_choice
        mode = choose_tools(choice if isinstance(choice, str) else None,
                            choice.function.name if isinstance(choice, NamedToolChoice) else None,
                            [f.name for f in functions])
        tools = ToolUse(functions, mode, self.parallel_tool_calls is not False)
        reasoning = Reasoning(self.reasoning_effort, self.thinking_token_budget)
        return Turn(messages, _format(self.response_format), params, tools, reasoning)

    def _refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise InvalidRequest("only n=1 is supported", param="n")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("'logprobs' must be true when 'top_logprobs' is set", param="top_logprobs")


MAX_PROMPTS = 64  # prompts (times n) one legacy completion request may ask for


class CompletionRequest(DryFields):
    """The legacy Completions API (`POST /v1/completions`), as OpenAI and vLLM take it; `response_format` is an
    extension, as in vLLM: the same grammar and guarantees as Chat."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for this API
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)  # OpenAI takes up to 5, vLLM more
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)
    logit_bias: dict[str, float] | None = None
    response_format: AnyFormat | None = None
    _not_null = refuse_null("response_format")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids (400 when there are none, or too many)."""
        prompt = self.prompt
        prompts: list[str | list[int]]
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]  # type: ignore[arg-type]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts:
            raise InvalidRequest("'prompt' holds no prompt", param="prompt")
        if len(prompts) * self.n > MAX_PROMPTS:
            raise InvalidRequest(f"at most {MAX_PROMPTS} completions per request (prompts times n)", param="n")
        return prompts

    def params(self) -> tuple[ResponseFormat, SamplingParams]:
        if self.suffix:
            raise InvalidRequest("'suffix' is not supported", param="suffix")
        if self.best_of not in (None, self.n):
            raise InvalidRequest("'best_of' other than n is not supported", param="best_of")
        if self.logit_bias:
            raise InvalidRequest("'logit_bias' is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        if self.echo and self.logprobs is not None and self.stream:
            raise InvalidRequest("'echo' with 'logprobs' (the prompt's logprobs) is not supported when streaming yet",
                                 param="echo")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > 4:
            raise InvalidRequest("'stop' accepts at most 4 sequences", param="stop")
        params = sampling(self.max_tokens, self.temperature, self.top_p, self.frequency_penalty,
                          self.presence_penalty, top_k=self.top_k, seed=self.seed, stop=stop, dry=self)
        scored = self.logprobs if self.echo else None
        return _format(self.response_format), replace(params, logprobs=self.logprobs, prompt_logprobs=scored)


def _message(m: ChatMessage, index: int, files: media.Files | None) -> Message:
    role = "system" if m.role == "developer" else m.role
    calls = tuple(_call(c, index) for c in m.tool_calls or ())
    if m.role == "tool" and not m.tool_call_id:
        raise InvalidRequest("a tool message needs 'tool_call_id'", param=f"messages[{index}].tool_call_id")
    if m.content is None:
        if calls:
            return Message("assistant", "", calls)
        raise InvalidRequest("message content is required", param=f"messages[{index}].content")
    if isinstance(m.content, str):
        return Message(role, m.content, calls, m.tool_call_id)
    parts: list[Part] = []
    for j, part in enumerate(m.content):
        where = f"messages[{index}].content[{j}]"
        if isinstance(part, TextPart):
            parts.append(part.text)
        elif isinstance(part, ImagePart):
            detail = media.check_detail(part.image_url.detail, f"{where}.image_url.detail")
            parts += media.load(media.decode_url(part.image_url.url, f"{where}.image_url.url"), where, detail)
        elif isinstance(part, FilePart):
            parts += media.load(_file_data(part.file, files, where), where)
        else:
            raise InvalidRequest(f"content parts of type '{part.type}' are not supported; send text, image_url "
                                 "or file parts", param=where)
    return replace(media.message(role, parts, f"messages[{index}].content"), tool_calls=calls,
                   tool_call_id=m.tool_call_id)


def _file_data(ref: FileRef, files: media.Files | None, where: str) -> bytes:
    if ref.file_data is not None:
        data = ref.file_data
        return media.decode_url(data if data.startswith("data:") else f"data:;base64,{data}", f"{where}.file")
    if ref.file_id is not None and files is not None:
        return files(ref.file_id)
    raise InvalidRequest("a file part needs 'file_id' or 'file_data'", param=f"{where}.file")


def _call(call: ToolCallWire, index: int) -> ToolCall:
    try:
        json.loads(call.function.arguments)
    except ValueError:
        raise InvalidRequest("tool call arguments must be a JSON string",
                             param=f"messages[{index}].tool_calls") from None
    return ToolCall(call.id, call.function.name, call.function.arguments)


def _tools(tools: list[FunctionTool]) -> tuple[Tool, ...]:
    out: list[Tool] = []
    for i, tool in enumerate(tools):
        spec = tool.function
        if not NAME.match(spec.name):
            raise InvalidRequest("function names are 1-64 characters of a-z, A-Z, 0-9, _ and -",
                                 param=f"tools[{i}].function.name")
        if spec.name in {t.name for t in out}:
            raise InvalidRequest(f"duplicate function name {spec.name!r}", param=f"tools[{i}].function.name")
        raw = spec.parameters if spec.parameters is not None else {"type": "object", "properties": {}}
        strict = bool(spec.strict)
        try:
            parameters = check_schema(raw, strict=strict, what=f"function '{spec.name}'")
        except SchemaError as exc:
            raise SchemaError(exc.message, param=f"tools[{i}].function.parameters",
                              code="invalid_function_parameters") from exc
        out.append(Tool(spec.name, parameters, spec.description or "", strict))
    return tuple(out)


def _format(fmt: AnyFormat | None) -> ResponseFormat:
    if fmt is None or isinstance(fmt, TextFormat):
        return TEXT
    if isinstance(fmt, JsonObjectFormat):
        return ResponseFormat("json_object", name="json_object")
    spec = fmt.json_schema
    if not NAME.match(spec.name):
        raise InvalidRequest(
            "'response_format.json_schema.name' must be 1-64 characters of a-z, A-Z, 0-9, _ and -",
            param="response_format.json_schema.name",
        )
    strict = bool(spec.strict)
    schema = check_schema(spec.schema_ or {}, strict=strict, what=f"response_format {spec.name!r}")
    return ResponseFormat("json_schema", schema, spec.name, strict)


# What str.splitlines() takes for a line end, and so the line readers of httpx and requests, besides CR and LF
# (which JSON escapes, as it does every control character): escaped, so that a client reading a stream line by
# line never cuts an event in two, whatever the model writes.
_LINE_ENDS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_json(obj: object) -> str:
    """`obj` as JSON for an SSE `data:` line: UTF-8 as it is, line ends of any kind escaped."""
    return json.dumps(obj, ensure_ascii=False).translate(_LINE_ENDS)
