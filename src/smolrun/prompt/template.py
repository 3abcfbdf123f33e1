"""Render messages with a model's chat template (from GGUF metadata), in a sandboxed Jinja environment."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from smolrun.errors import InvalidRequest
from smolrun.turn import Message

# Used when a model file carries no template.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _raise(message: str) -> NoReturn:
    raise InvalidRequest(f"the model's chat template refused the conversation: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # Hugging Face templates expect tojson without HTML escaping (Jinja's default filter escapes <, >, &).
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _parts(message: Message) -> list[dict[str, str]]:
    parts = message.as_parts() or ("",)  # an empty list would break templates that look at content[0]
    return [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts]


def render(
    template: str | None,
    messages: tuple[Message, ...],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    parts: bool = False,
    **kwargs: Any,
) -> str:
    """The prompt text for `messages`, ending with the assistant's generation prompt. With `parts`, content
    is given as a list of typed parts (vision templates), pictures as `{"type": "image"}`."""
    try:
        return str(
            _compile(template or CHATML).render(
                messages=[{"role": m.role, "content": _parts(m) if parts else m.content} for m in messages],
                bos_token=bos_token,
                eos_token=eos_token,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
        )
    except TemplateError as exc:
        raise InvalidRequest(f"could not render the model's chat template: {exc}") from exc
