"""Pure values that flow from the HTTP edge to the engine and back: no I/O, no pydantic."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "cancelled"]
Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
EFFORTS: tuple[str, ...] = get_args(Effort)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as on the wire


Detail = Literal["low", "high", "auto"]


@dataclass(frozen=True)
class Image:
    """A picture for a model that can see: its encoded bytes (PNG, JPEG, ...), already checked to decode.
    `detail` "low" shows it as one tile; "high" and "auto" let the model's processor split it into tiles."""

    data: bytes
    detail: Detail = "auto"


@dataclass(frozen=True)
class Video:
    """Frames sampled from a video (encoded images), with the second each was taken at."""

    frames: tuple[bytes, ...]
    seconds: tuple[float, ...]
    duration: float


Part = str | Image | Video


@dataclass(frozen=True)
class Message:
    role: Role
    content: str  # the text (of every text part, for messages with pictures)
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn that called functions
    tool_call_id: str | None = None  # a tool turn: which call it answers
    parts: tuple[Part, ...] = ()  # set when the message has pictures: text and pictures in order

    @classmethod
    def of(cls, role: Role, parts: list[Part]) -> Message:
        """A message from content parts; plain text when it has no pictures."""
        text = "\n".join(p for p in parts if isinstance(p, str))
        pictures = any(not isinstance(p, str) for p in parts)
        return cls(role, text, parts=tuple(parts) if pictures else ())

    @property
    def media(self) -> tuple[Image | Video, ...]:
        return tuple(p for p in self.parts if not isinstance(p, str))

    def as_parts(self) -> tuple[Part, ...]:
        return self.parts or ((self.content,) if self.content else ())


@dataclass(frozen=True)
class Tool:
    """A function the model may call; `parameters` is already checked (see constraints.check_schema)."""

    name: str
    parameters: dict[str, Any]
    description: str = ""
    strict: bool = False


@dataclass(frozen=True)
class ToolUse:
    """Which functions the model may call in a turn: choice "none", "auto", "required", or one name."""

    tools: tuple[Tool, ...] = ()
    choice: str = "auto"
    parallel: bool = True
    max_calls: int = 8  # calls one turn may make with `parallel` (a tiny model may repeat one until max_tokens)

    @property
    def active(self) -> tuple[Tool, ...]:
        if self.choice == "none":
            return ()
        if self.choice in ("auto", "required"):
            return self.tools
        return tuple(t for t in self.tools if t.name == self.choice)

    @property
    def answer_allowed(self) -> bool:
        return not self.active or self.choice == "auto"


NO_TOOLS = ToolUse()


@dataclass(frozen=True)
class ResponseFormat:
    """What the answer must look like; `schema` is set only for json_schema (already checked)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    schema: dict[str, Any] | None = None
    name: str = "response"
    strict: bool = False


TEXT = ResponseFormat()


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the end of the context window
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0  # OpenAI semantics: minus penalty x count of each token generated so far
    presence_penalty: float = 0.0  # minus penalty once for each token generated so far
    # The DRY repetition penalty (backends/repetition.py); None: the engine's default, on for JSON answers only.
    dry_multiplier: float | None = None
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    logprobs: int | None = None  # None: none; N: each generated token's logprob and the N likeliest tokens
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (vLLM's prompt_logprobs)


@dataclass(frozen=True)
class Reasoning:
    """How much a thinking model may think: `effort` None is the model's default; `budget` overrides the
    effort's token budget (vLLM's `thinking_token_budget`)."""

    effort: Effort | None = None
    budget: int | None = None


DEFAULT_REASONING = Reasoning()


@dataclass(frozen=True)
class Turn:
    """One generation request: a conversation, the shape of the answer, and how to sample it."""

    messages: tuple[Message, ...]
    format: ResponseFormat = TEXT
    params: SamplingParams = field(default_factory=SamplingParams)
    tools: ToolUse = NO_TOOLS
    reasoning: Reasoning = DEFAULT_REASONING

    @property
    def media(self) -> tuple[Image | Video, ...]:
        return tuple(x for m in self.messages for x in m.media)


Branch = Literal["text", "calls", "code"]  # of a model turn: the answer, function calls, a code call


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability under the model after the grammar's mask (before penalties and
    temperature), and the likeliest tokens there with theirs. A token the grammar forced has 0."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    tokens: tuple[int, ...] = ()  # the tokens generated since the previous delta
    branch: Branch = "text"  # the branch the grammar took, as the decoder read it from the tokens
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked for them


@dataclass(frozen=True)
class ReasoningDelta:
    """Text of a thinking model's think block (without its tags)."""

    text: str


@dataclass(frozen=True)
class DecodeStats:
    """Per-generation measurements, for benchmarks and logs."""

    prompt_tokens: int
    completion_tokens: int
    forced_tokens: int  # tokens the grammar forced, evaluated in batches (fast-forward)
    forward_passes: int
    prefill_s: float
    decode_s: float
    mask_us: tuple[float, ...] = ()  # per sampled token, time to compute the grammar mask
    reasoning_tokens: int = 0  # of completion_tokens, those of the think block (its tags included)
    cached_tokens: int = 0  # of prompt_tokens, those the KV cache already held (prefix reuse)
    closed: bool = False  # the JSON answer was closed at the token budget (finish_reason "length", yet valid)
    close_us: tuple[float, ...] = ()  # each search for a closing (near the budget), in microseconds


@dataclass(frozen=True)
class Done:
    finish_reason: FinishReason
    stats: DecodeStats
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # when asked for: the prompt's tokens after its first


Event = TextDelta | ReasoningDelta | Done
