"""A loaded model with its grammar cache and its runner: Turn -> prompt tokens + grammar -> stream of events.

The engine prepares turns and hands them to its one runner (backends/factory.py), which owns how turns share
the hardware: a model with many sequences (llama.cpp) batches them continuously (backends/batch.py); a model
with one (transformers) runs one turn at a time (scheduler.py); a model on vLLM servers sends each turn there
at once and replays its tokens (backends/vllm.py), vLLM batching them. Every runner admits a turn when it is
submitted, so a full queue is a 429 before any byte is streamed.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import cached_property
from typing import cast

from smolrun.backends.base import BatchModel, Model, Pixels
from smolrun.backends.batch import Job
from smolrun.backends.closing import Closing, Vocabulary, schema_hints, shortest_close
from smolrun.backends.decode import Prepared, never, token_budget
from smolrun.backends.factory import Runner, batches, load_model, start_runner
from smolrun.backends.parts import Parts, Tag
from smolrun.backends.repetition import DRY_MULTIPLIER
from smolrun.backends.vllm import VllmModel
from smolrun.config import Settings
from smolrun.constraints.grammar import Grammar, GrammarCache
from smolrun.errors import ContextLengthExceeded, InvalidRequest, QueueFull
from smolrun.prompt import render
from smolrun.prompt.profiles import Profile, detect
from smolrun.prompt.tools import OPEN as TOOL_OPEN
from smolrun.prompt.tools import render_history
from smolrun.scheduler import EventStream, Item, Sink
from smolrun.thinking import ThinkBlock
from smolrun.turn import Event, ResponseFormat, SamplingParams, Turn


class Engine:
    def __init__(self, model: Model | BatchModel | VllmModel, max_queue: int = 16, max_inflight: int = 64,
                 dry_multiplier: float = DRY_MULTIPLIER, stream_interval: float = 0.0) -> None:
        self.model = model
        self.stream_interval = stream_interval  # seconds within which streamed deltas are merged (EventStream)
        self.dry_multiplier = dry_multiplier  # the DRY penalty of JSON answers that do not set their own
        self._plans: dict[tuple[str, Closing], tuple[int, ...] | None] = {}  # closings from each grammar's start
        self.max_queue = max_queue  # turns waiting for the model before QueueFull
        self.max_inflight = max_inflight  # vLLM: turns on its servers at once
        self._runner: Runner | None = None  # started by the first turn
        self._runner_lock = threading.Lock()
        self._preparing = 0  # turns in prepare_async (counted on the event loop's thread)
        self._prepare_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="smolrun-prepare")
        self.grammars = GrammarCache(model.lltokenizer)
        self.profile: Profile = detect(model.chat_template)
        self._think_tokens: tuple[int, int] | None = None
        if self.profile.thinking is not None:  # budgets need the tags as single special tokens (ThinkBlock)
            ids = [self.grammars.special_token(t) for t in (self.profile.thinking.open, self.profile.thinking.close)]
            self._think_tokens = (ids[0], ids[1]) if ids[0] is not None and ids[1] is not None else None

    @classmethod
    def load(cls, settings: Settings, model: str | None = None, mmproj: str | None = None) -> Engine:
        """The engine for `model` (default: settings.model); see backends.factory.load_model."""
        return cls(load_model(settings, model, mmproj), max_queue=settings.max_queue,
                   max_inflight=settings.max_inflight, dry_multiplier=settings.dry_multiplier,
                   stream_interval=settings.stream_interval_ms / 1000)

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

    def prepare(self, turn: Turn, allow_code: bool = False, must_code: bool = False,
                continuing: bool = False) -> Prepared:
        """`allow_code`: the turn may be a code call; `must_code`: it must be one. A JSON answer whose shortest
        document does not fit the budget is a 400, unless the turn is `continuing` an admitted response."""
        think = self.think_block(turn)
        grammar = self.grammars.get(turn.format, allow_code=allow_code or must_code, tools=turn.tools, think=think,
                                    code=self.profile.code, must_code=must_code)
        text = self.render(turn, thinks=think is not None)
        self._refuse_overlong(text, "the messages ({} characters) use more", "messages")
        media, vision = turn.media, self.model.vision
        pixels: tuple[Pixels, ...] = ()
        if vision is not None and self.profile.content_parts:  # text alone too: an image token typed in it is a 400
            prompt, pixels = vision.prompt(text, media)
        elif media and isinstance(self.model, VllmModel):
            raise InvalidRequest("the vLLM engine takes no pictures yet (smolrun's picture layout is not what vLLM's "
                                 "image processor builds); serve vision models on llama.cpp or transformers",
                                 param="messages")
        elif media:
            raise InvalidRequest(f"the model '{self.name}' cannot see images; send text only, or use a vision "
                                 "model (smolrun serve --vision-model ...)", param="messages")
        else:
            prompt = self.model.tokenize(text)
        closing = self._closing(turn, grammar, think, allow_code, must_code)
        return Prepared(prompt, grammar, self._sampling(turn, closing), think, pixels, closing,
                        self._fitting_plan(grammar, closing, len(prompt), turn.params.max_tokens, continuing),
                        self._parts(turn, think, allow_code or must_code))

    def prepare_prompt(self, prompt: str | list[int], fmt: ResponseFormat, params: SamplingParams) -> Prepared:
        """A legacy completion's turn: the prompt as it is, no chat template (text, its special tokens parsed,
        or token ids), continued as free text or as a document of `fmt`, closed at the budget like an answer."""
        if isinstance(prompt, str):
            self._refuse_overlong(prompt, "the prompt ({} characters) uses more", "prompt")
            tokens = self.model.tokenize(prompt)
        else:
            tokens = list(prompt)
            if any(not 0 <= t < self.model.n_vocab for t in tokens):
                raise InvalidRequest(f"prompt token ids must be between 0 and {self.model.n_vocab - 1}", param="prompt")
        if not tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if params.prompt_logprobs is not None and not self.batches:
            raise InvalidRequest("the prompt's logprobs (echo with logprobs) are available on the llama.cpp engine "
                                 "only", param="echo")
        turn = Turn((), fmt, params)
        grammar = self.grammars.get(fmt)
        closing = self._closing(turn, grammar, None, False, False)
        return Prepared(tokens, grammar, self._sampling(turn, closing), None, (), closing,
                        self._fitting_plan(grammar, closing, len(tokens), params.max_tokens, False))

    def _refuse_overlong(self, text: str, what: str, param: str) -> None:
        """A 400 for a text with more tokens than the context can hold, told without tokenizing it; `what` says so
        with a {} for its length."""
        if len(text) > self.model.n_ctx * self._longest_token:
            raise ContextLengthExceeded(f"This model's maximum context length is {self.model.n_ctx} tokens, but "
                                        f"{what.format(len(text))}.", param=param)

    def _fitting_plan(self, grammar: Grammar | None, closing: Closing | None, prompt: int, max_tokens: int | None,
                      continuing: bool) -> tuple[int, ...] | None:
        """The closing from the grammar's start; a 400 (before queueing) when the prompt leaves no room, or when
        the shortest document does not fit the budget, unless the turn is `continuing` an admitted response."""
        budget = token_budget(self.model.n_ctx, prompt, max_tokens)
        plan = self._plan(grammar, closing) if grammar is not None and closing is not None else None
        if plan is not None and len(plan) > budget and not continuing:
            limit = f"max_tokens is {max_tokens}" if max_tokens is not None else f"the context leaves {budget} tokens"
            raise InvalidRequest(f"The shortest JSON document that the response format allows takes {len(plan)} "
                                 f"tokens, but {limit}: raise max_tokens to at least {len(plan)}.",
                                 param="max_tokens")
        return plan

    def _parts(self, turn: Turn, think: ThinkBlock | None, code: bool) -> Parts:
        """The layout of the turn's grammar (constraints/grammar.turn_source), for the decoder to follow."""
        tags = []
        if code:
            opening = self.profile.code.open
            tags.append(Tag("code", opening.encode(), self.grammars.special_token(opening)))
        if turn.tools.active:
            tags.append(Tag("calls", TOOL_OPEN.encode(), self.grammars.special_token(TOOL_OPEN)))
        return Parts((think.open_token, think.close_token) if think is not None else None, tuple(tags))

    def _sampling(self, turn: Turn, closing: Closing | None) -> SamplingParams:
        """The turn's sampling parameters, the DRY penalty resolved: unless the request set it, the engine's for
        a JSON answer (it applies inside that answer only: function calls and code repeat themselves for good
        reasons), none otherwise. vLLM has no DRY sampler: a request that asks for it there is a 400."""
        params = turn.params
        if params.logprobs is not None and isinstance(self.model, VllmModel):
            raise InvalidRequest("logprobs are not available on the vLLM engine yet (smolrun replays the tokens vLLM "
                                 "returns, not their probabilities); serve on llama.cpp or transformers for them",
                                 param="logprobs")
        if params.dry_multiplier is None:
            on = closing is not None and not isinstance(self.model, VllmModel)
            return replace(params, dry_multiplier=self.dry_multiplier if on else 0.0)
        if params.dry_multiplier > 0 and isinstance(self.model, VllmModel):
            raise InvalidRequest("the vLLM engine has no DRY repetition penalty: leave out dry_multiplier (or send 0)",
                                 param="dry_multiplier")
        return params

    def _closing(self, turn: Turn, grammar: Grammar | None, think: ThinkBlock | None, allow_code: bool,
                 must_code: bool) -> Closing | None:
        """How to close the turn's JSON answer at the budget; None when the answer is free text or cannot come
        (function calls and code are never closed: nobody should run cut arguments or code). Nor is a turn that
        starts with a think block: its grammar's thought lexeme has a token limit, and then llguidance cannot
        roll back, which the search needs."""
        if (grammar is None or turn.format.type == "text" or must_code or not turn.tools.answer_allowed
                or think is not None):
            return None
        keys, texts, names, values = schema_hints(turn.format.schema)
        return Closing(self.model.lltokenizer, self._vocabulary, keys, texts, names, values,
                       answer_only=not allow_code and not turn.tools.active)

    def _plan(self, grammar: Grammar, closing: Closing) -> tuple[int, ...] | None:
        """A closing from the grammar's start: the shortest document, as far as the search sees (cached)."""
        key = (grammar.key, closing)
        if key not in self._plans:
            found = shortest_close(grammar.matcher(), closing.scan(), closing, limit=self.model.n_ctx)
            if len(self._plans) >= 256:
                self._plans.clear()
            self._plans[key] = tuple(found) if found is not None else None
        return self._plans[key]

    @cached_property
    def _vocabulary(self) -> Vocabulary:
        return Vocabulary.of(self.model.lltokenizer)

    async def prepare_async(self, turn: Turn, allow_code: bool = False, must_code: bool = False,
                            continuing: bool = False) -> Prepared:
        """`prepare` off the event loop, on the engine's own two threads, admitted like generation: at most
        `max_queue` new turns prepare at once (then QueueFull, a 429), so that big prompts cannot pile up on
        threads; one whose client left before its turn came is never prepared. A `continuing` turn (a later
        turn of an admitted response) is never refused."""
        return await self._off_loop(lambda: self.prepare(turn, allow_code, must_code, continuing), continuing)

    async def prepare_prompt_async(self, prompt: str | list[int], fmt: ResponseFormat,
                                   params: SamplingParams) -> Prepared:
        """`prepare_prompt` off the event loop, admitted like `prepare_async`."""
        return await self._off_loop(lambda: self.prepare_prompt(prompt, fmt, params), False)

    async def _off_loop(self, work: Callable[[], Prepared], continuing: bool) -> Prepared:
        if not continuing and self._preparing >= self.max_queue:
            raise QueueFull("the model is busy: too many requests are being prepared; retry shortly")
        self._preparing += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, work)
        finally:
            self._preparing -= 1

    @cached_property
    def _longest_token(self) -> int:
        """The most characters one token stands for (special tokens included): a prompt text longer than
        n_ctx times this cannot fit."""
        tokenizer = self.model.lltokenizer
        return max(len(tokenizer.decode_bytes([t])) for t in range(tokenizer.vocab_size))

    @property
    def batches(self) -> bool:
        """Whether turns decode together (continuous batching) rather than one at a time."""
        return batches(self.model)

    def stream(self, prepared: Prepared, continuing: bool = False) -> EventStream:
        """Admit one turn now (QueueFull when too many wait, unless it is `continuing` an admitted response)
        and stream its events; leaving early cancels it."""
        events = EventStream(self.stream_interval)
        self._submit(prepared, events.sink, events.cancelled.is_set, bounded=not continuing)
        return events

    def generate(self, prepared: Prepared, cancelled: Callable[[], bool] = never) -> Iterator[Event]:
        """The same for a caller off the event loop (the CLI, benchmarks), admitted at once too."""
        items: queue.Queue[Item] = queue.Queue()
        gone = threading.Event()
        self._submit(prepared, items.put, lambda: gone.is_set() or cancelled())
        return self._drain(items, gone)

    @staticmethod
    def _drain(items: queue.Queue[Item], gone: threading.Event) -> Iterator[Event]:
        try:
            while (item := items.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            gone.set()

    def job(self, prepared: Prepared, sink: Sink, cancelled: Callable[[], bool]) -> Job:
        """A prepared turn as a batch loop takes it (tests and benchmarks drive a BatchLoop themselves)."""
        return Job.of(prepared, cast(BatchModel, self.model), sink, cancelled)

    def _submit(self, prepared: Prepared, sink: Sink, cancelled: Callable[[], bool], bounded: bool = True) -> None:
        self._start().submit(prepared, sink, cancelled, bounded)

    def _start(self) -> Runner:
        with self._runner_lock:
            if self._runner is None:
                self._runner = start_runner(self.model, self.max_queue, self.max_inflight)
            return self._runner

    def waiting(self) -> int:
        """Turns waiting for the model (not yet decoding)."""
        return 0 if self._runner is None else self._runner.waiting()

    def running(self) -> int:
        """Turns being decoded."""
        return 0 if self._runner is None else self._runner.running()

    def kv_cells(self) -> tuple[int, int] | None:
        """KV cells in use and in all, on a model that batches (its sequences share one cache); else None."""
        if not self.batches:
            return None
        used = self._runner.kv_used() if self._runner is not None else None
        return used or 0, self.model.n_ctx

    def close(self) -> None:
        """End every live and queued turn (ServerShuttingDown, a 503) and stop the runner's thread; a later turn
        starts a new one. The lock is held until the old thread has exited, so that a new runner never drives
        the model beside it (two threads on one llama.cpp context)."""
        with self._runner_lock:
            runner, self._runner = self._runner, None
            if runner is not None:
                runner.close()

    def shutdown(self) -> None:
        """Close, and free the model (its memory; the vLLM server launched for it, if any): the engine is done."""
        self.close()
        self._prepare_pool.shutdown(wait=True, cancel_futures=True)  # no prepare left to read a freed model
        free = getattr(self.model, "close", None)
        if free is not None:
            free()
