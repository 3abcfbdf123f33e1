"""A loaded model with its grammar cache: Turn -> prompt tokens + grammar -> stream of events."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from smolrun.backends.base import Model
from smolrun.backends.decode import decode, never, token_budget
from smolrun.config import Settings
from smolrun.constraints.grammar import Grammar, GrammarCache
from smolrun.models import resolve
from smolrun.prompt import render
from smolrun.prompt.tools import render_history
from smolrun.turn import Event, SamplingParams, Turn


@dataclass(frozen=True)
class Prepared:
    """A turn ready to decode: checked, compiled and tokenized (every 400 is raised before this)."""

    prompt: list[int]
    grammar: Grammar | None
    params: SamplingParams


class Engine:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.grammars = GrammarCache(model.lltokenizer)

    @classmethod
    def load(cls, settings: Settings) -> Engine:
        from smolrun.backends.llama_cpp import LlamaCppModel

        resolved = resolve(settings.model, offline=settings.offline)
        return cls(LlamaCppModel(resolved.path, name=resolved.name, n_ctx=settings.n_ctx, n_threads=settings.threads))

    @property
    def name(self) -> str:
        return self.model.name

    def render(self, turn: Turn) -> str:
        m = self.model
        messages = render_history(turn.messages, turn.tools)
        return render(m.chat_template, messages, bos_token=m.bos_token, eos_token=m.eos_token)

    def prepare(self, turn: Turn, allow_code: bool = False) -> Prepared:
        grammar = self.grammars.get(turn.format, allow_code=allow_code, tools=turn.tools)
        prompt = self.model.tokenize(self.render(turn))
        token_budget(self.model.n_ctx, len(prompt), turn.params.max_tokens)  # 400 before queueing, not mid-stream
        return Prepared(prompt, grammar, turn.params)

    def generate(self, prepared: Prepared, cancelled: Callable[[], bool] = never) -> Iterator[Event]:
        matcher = prepared.grammar.matcher() if prepared.grammar is not None else None
        return decode(self.model, prepared.prompt, prepared.params, matcher, cancelled)
