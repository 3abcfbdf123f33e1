"""A loaded model with its grammar cache: Turn -> prompt tokens + grammar -> stream of events."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from smolrun.backends.base import Model, Pixels
from smolrun.backends.decode import decode, never, token_budget
from smolrun.config import Settings
from smolrun.constraints.grammar import Grammar, GrammarCache
from smolrun.errors import InvalidRequest
from smolrun.models import REGISTRY, hub_offline, resolve
from smolrun.prompt import render
from smolrun.prompt.profiles import Profile, detect
from smolrun.prompt.tools import render_history
from smolrun.thinking import ThinkBlock, split_thoughts
from smolrun.turn import Event, SamplingParams, Turn


@dataclass(frozen=True)
class Prepared:
    """A turn ready to decode: checked, compiled and tokenized (every 400 is raised before this)."""

    prompt: list[int]
    grammar: Grammar | None
    params: SamplingParams
    think: ThinkBlock | None = None  # the turn starts with a think block
    pixels: tuple[Pixels, ...] = ()  # the pictures at the prompt's image tokens


class Engine:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.grammars = GrammarCache(model.lltokenizer)
        self.profile: Profile = detect(model.chat_template)
        self._think_tokens: tuple[int, int] | None = None
        if self.profile.thinking is not None:  # budgets need the tags as single special tokens (ThinkBlock)
            ids = [self.grammars.special_token(t) for t in (self.profile.thinking.open, self.profile.thinking.close)]
            self._think_tokens = (ids[0], ids[1]) if ids[0] is not None and ids[1] is not None else None

    @classmethod
    def load(cls, settings: Settings, model: str | None = None, mmproj: str | None = None) -> Engine:
        """The engine for `model` (default: settings.model), with the vision projector `mmproj` on llama.cpp
        (see models.resolve). Hugging Face directories load on transformers whatever the backend setting."""
        name = model or settings.model
        if settings.backend == "transformers" or (name not in REGISTRY and Path(name).expanduser().is_dir()):
            if mmproj is not None:
                raise InvalidRequest("--mmproj is for GGUF models on llama.cpp; on transformers a vision model "
                                     "carries its own image side", param="mmproj")
            from smolrun.backends.transformers import TransformersModel, hf_source

            source = hf_source(name, offline=settings.offline)
            return cls(TransformersModel(source, n_ctx=settings.n_ctx, device=settings.device,
                                         threads=settings.threads, offline=hub_offline(settings.offline)))
        from smolrun.backends.llama_cpp import LlamaCppModel

        resolved = resolve(name, offline=settings.offline, mmproj=mmproj)
        return cls(LlamaCppModel(resolved.path, name=resolved.name, n_ctx=settings.n_ctx, n_threads=settings.threads,
                                 mmproj=resolved.mmproj))

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def sees(self) -> bool:
        return self.model.vision is not None

    def think_block(self, turn: Turn) -> ThinkBlock | None:
        """The think block this turn starts with, or None when the model does not think in it."""
        thinking, tokens = self.profile.thinking, self._think_tokens
        budget = self.profile.think_budget(turn.messages, turn.reasoning)
        if thinking is None or tokens is None or budget is None:
            return None
        return ThinkBlock(thinking.open, thinking.close, *tokens, budget)

    def render(self, turn: Turn, thinks: bool = False) -> str:
        m, profile = self.model, self.profile
        messages = profile.arrange(render_history(turn.messages, turn.tools, describe_tools=not profile.native_tools))
        return render(m.chat_template, messages, bos_token=m.bos_token, eos_token=m.eos_token,
                      parts=profile.content_parts, **profile.template_kwargs(thinks, turn.tools))

    def prepare(self, turn: Turn, allow_code: bool = False) -> Prepared:
        think = self.think_block(turn)
        grammar = self.grammars.get(turn.format, allow_code=allow_code, tools=turn.tools, think=think,
                                    code=self.profile.code)
        text = self.render(turn, thinks=think is not None)
        media, vision = turn.media, self.model.vision
        pixels: tuple[Pixels, ...] = ()
        if vision is not None and self.profile.content_parts:  # text alone too: an image token typed in it is a 400
            prompt, pixels = vision.prompt(text, media)
        elif media:
            raise InvalidRequest(f"the model '{self.name}' cannot see images; send text only, or use a vision "
                                 "model (smolrun serve --vision-model ...)", param="messages")
        else:
            prompt = self.model.tokenize(text)
        token_budget(self.model.n_ctx, len(prompt), turn.params.max_tokens)  # 400 before queueing, not mid-stream
        return Prepared(prompt, grammar, turn.params, think, pixels)

    def generate(self, prepared: Prepared, cancelled: Callable[[], bool] = never) -> Iterator[Event]:
        matcher = prepared.grammar.matcher() if prepared.grammar is not None else None
        events = decode(self.model, prepared.prompt, prepared.params, matcher, cancelled, prepared.pixels)
        if prepared.think is None:
            return events
        return split_thoughts(events, prepared.think)
