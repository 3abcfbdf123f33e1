"""What a model family's chat template expects around the messages: thinking switches, tools, role rules.

The template itself always comes from the loaded model (GGUF metadata or tokenizer_config.json); a profile
only knows the conventions that the template's text does not say: which keyword switches thinking, which tags
wrap the thoughts, whether the template lists tools itself, whether roles must alternate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smolrun.turn import Message, Reasoning, ToolUse

# Thought tokens allowed per effort (tags included). The grammar closes the think block at the budget, so a
# small model cannot think until max_tokens; `thinking_token_budget` overrides these per request.
BUDGETS: dict[str, int] = {"minimal": 128, "low": 512, "medium": 2048, "high": 8192, "xhigh": 16384, "max": 32768}
DEFAULT_EFFORT = "medium"


@dataclass(frozen=True)
class Thinking:
    """A dual-mode model: thoughts between `open` and `close`, switched by a template keyword and flags."""

    open: str = "<think>"
    close: str = "</think>"
    switch: str = "enable_thinking"  # the template keyword (SmolLM3, Qwen3)
    flags: tuple[str, str] | None = None  # (on, off) flags in the system message that override the keyword


@dataclass(frozen=True)
class CodeFormat:
    """How the model writes a code call for the code interpreter: the code between `open` and `close`."""

    open: str
    close: str
    described: str  # for the instructions: "reply with <described> and nothing else"

    def wrap(self, code: str) -> str:
        return f"{self.open}{code}{self.close}"


FENCE = CodeFormat("```python\n", "\n```", "a single ```python code block")
CODE_TAGS = CodeFormat("<code>", "</code>", "Python code between <code> and </code>")  # SmolLM3's python tools


@dataclass(frozen=True)
class Profile:
    name: str
    thinking: Thinking | None = None
    code: CodeFormat = FENCE
    native_tools: bool = False  # the template describes `tools` itself
    alternating: bool = False  # the template refuses two turns of one role in a row (Gemma)
    content_parts: bool = False  # the template reads content as typed parts, pictures among them (SmolVLM)

    def think_budget(self, messages: tuple[Message, ...], reasoning: Reasoning) -> int | None:
        """Tokens the turn's think block may use, or None when the model does not think in this turn."""
        if self.thinking is None:
            return None
        on = reasoning.effort != "none"
        flags = self.thinking.flags
        if flags is not None and messages and messages[0].role == "system":
            system = messages[0].content
            if flags[1] in system:  # the template lets the system flags win over the keyword
                on = False
            elif flags[0] in system.replace(flags[1], ""):
                on = True
        if not on:
            return None
        if reasoning.budget is not None:
            return reasoning.budget
        effort = DEFAULT_EFFORT if reasoning.effort in (None, "none") else reasoning.effort
        return BUDGETS[effort]

    def template_kwargs(self, thinks: bool, tools: ToolUse) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.thinking is not None:
            kwargs[self.thinking.switch] = thinks
        if self.native_tools and tools.active:
            kwargs["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                                 "parameters": t.parameters}}
                               for t in tools.active]
        return kwargs

    def arrange(self, messages: tuple[Message, ...]) -> tuple[Message, ...]:
        """Messages in the order and grouping the template accepts."""
        if not self.alternating:
            return messages
        merged: list[Message] = []
        for m in messages:
            if merged and merged[-1].role == m.role:
                last = merged[-1]
                merged[-1] = (Message.of(m.role, [*last.as_parts(), *m.as_parts()]) if last.parts or m.parts
                              else Message(m.role, f"{last.content}\n\n{m.content}"))
            else:
                merged.append(m)
        return tuple(merged)


GENERIC = Profile("generic")
CHATML = Profile("chatml")  # SmolLM2 and other ChatML templates without tools or thinking


def detect(template: str | None) -> Profile:
    """The profile of a chat template, from the conventions its text uses."""
    if template is None:
        return GENERIC
    tools = "tools" in template
    if "/no_think" in template:  # SmolLM3: the keyword plus /think and /no_think system flags
        return Profile("smollm3", Thinking(flags=("/think", "/no_think")), CODE_TAGS, native_tools=tools)
    if "enable_thinking" in template and "<think>" in template:  # Qwen3 and others with the same switch
        return Profile("thinking", Thinking(), native_tools=tools)
    if "<end_of_utterance>" in template:  # SmolVLM (Idefics3): string content renders as nothing, parts only
        return Profile("smolvlm", content_parts=True)
    if "<start_of_turn>" in template:
        return Profile("gemma3", alternating=True)
    if "<|im_start|>" in template:
        return Profile("chatml", native_tools=tools)
    return Profile("generic", native_tools=tools)
