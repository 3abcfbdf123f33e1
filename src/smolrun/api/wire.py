"""OpenAI Chat Completions wire models (pydantic, at the HTTP edge only) and their mapping to a Turn."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from smolrun.constraints import check_schema
from smolrun.errors import InvalidRequest
from smolrun.turn import TEXT, Message, ResponseFormat, SamplingParams, Turn

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class _Wire(BaseModel):
    # OpenAI adds optional fields often; unknown ones are accepted and ignored like the real API does.
    model_config = ConfigDict(extra="allow")


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class OtherPart(_Wire):
    type: Literal["image_url", "input_audio", "file", "refusal"]


ContentPart = Annotated[TextPart | OtherPart, Field(discriminator="type")]


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None


class JsonSchemaSpec(_Wire):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(_Wire):
    type: Literal["text"]


class JsonObjectFormat(_Wire):
    type: Literal["json_object"]


class JsonSchemaFormat(_Wire):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


AnyFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StreamOptions(_Wire):
    include_usage: bool = False


class ChatCompletionRequest(_Wire):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: AnyFormat | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # extension, as in vLLM and llama.cpp
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    reasoning_effort: str | None = None  # accepted; SmolLM2 has no thinking mode, so it has no effect

    def to_turn(self) -> Turn:
        self._refuse_unsupported()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > 4:
            raise InvalidRequest("'stop' accepts at most 4 sequences", param="stop")
        params = SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=stop,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
        )
        messages = tuple(_message(m, i) for i, m in enumerate(self.messages))
        return Turn(messages, _format(self.response_format), params)

    def _refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise InvalidRequest("only n=1 is supported", param="n")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        if self.tools:
            raise InvalidRequest("function calling ('tools') is not supported yet by this server", param="tools")
        if self.logprobs:
            raise InvalidRequest("'logprobs' is not supported", param="logprobs")


def _message(m: ChatMessage, index: int) -> Message:
    if m.role == "tool" or m.tool_calls:
        raise InvalidRequest("tool messages are not supported yet", param=f"messages[{index}]")
    role = "system" if m.role == "developer" else m.role
    if m.content is None:
        raise InvalidRequest("message content is required", param=f"messages[{index}].content")
    if isinstance(m.content, str):
        return Message(role, m.content)
    texts: list[str] = []
    for j, part in enumerate(m.content):
        if not isinstance(part, TextPart):
            raise InvalidRequest(
                f"content parts of type '{part.type}' are not supported by this model; send text parts",
                param=f"messages[{index}].content[{j}]",
            )
        texts.append(part.text)
    return Message(role, "\n".join(texts))


def _format(fmt: AnyFormat | None) -> ResponseFormat:
    if fmt is None or isinstance(fmt, TextFormat):
        return TEXT
    if isinstance(fmt, JsonObjectFormat):
        return ResponseFormat("json_object", name="json_object")
    spec = fmt.json_schema
    if not _NAME.match(spec.name):
        raise InvalidRequest(
            "'response_format.json_schema.name' must be 1-64 characters of a-z, A-Z, 0-9, _ and -",
            param="response_format.json_schema.name",
        )
    strict = bool(spec.strict)
    schema = check_schema(spec.schema_ or {}, strict=strict, what=f"response_format {spec.name!r}")
    return ResponseFormat("json_schema", schema, spec.name, strict)
