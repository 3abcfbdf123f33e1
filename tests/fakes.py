"""A byte-level model for tests without weights: llguidance's byte tokenizer and scripted logits."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from llguidance import LLTokenizer, TokenizerWrapper

from smolrun.backends.base import Feed, KVFull, Pixels

EOS = 256


class _ByteTokenizer:
    """Token i < 256 is byte i; token 256 is the end-of-sequence special token."""

    eos_token_id = EOS
    bos_token_id = None
    special_token_ids = [EOS]
    tokens = [bytes([i]) for i in range(256)] + [b"\xff<eos>"]

    def __call__(self, data: bytes | str) -> list[int]:
        return list(data.encode() if isinstance(data, str) else data)


def byte_tokenizer() -> LLTokenizer:
    return LLTokenizer(TokenizerWrapper(_ByteTokenizer()))


class _ByteVocab:
    """What both byte-level fakes share: the byte tokenizer's vocabulary, no template, no eyes."""

    n_vocab = 257
    eog_tokens = frozenset({EOS})
    chat_template: str | None = None
    bos_token = ""
    eos_token = "<eos>"
    vision = None

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode())

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else b""


class ByteModel(_ByteVocab):
    """Implements backends.base.Model. Logits are seeded noise plus a bias towards closing bytes, so random
    outputs under a grammar still end; `script` forces exact outputs instead (one token per step)."""

    name = "byte-model"
    reused = 0

    def __init__(self, seed: int = 0, n_ctx: int = 8192, script: bytes | None = None, favour: bytes = b'"]}0') -> None:
        self.lltokenizer = byte_tokenizer()
        self.n_ctx = n_ctx
        self.rng = np.random.default_rng(seed)
        self.script = list(script) + [EOS] if script is not None else None
        self.favour = list(favour)
        self.calls: list[list[int]] = []  # every batch given to prefill/extend

    def _logits(self) -> npt.NDArray[np.float32]:
        if self.script is not None:
            produced = sum(len(c) for c in self.calls[1:])
            logits = np.full(self.n_vocab, -10.0, dtype=np.float32)
            logits[self.script[min(produced, len(self.script) - 1)]] = 10.0
            return logits
        logits = self.rng.normal(size=self.n_vocab).astype(np.float32)
        logits[self.favour] += 3.0
        logits[EOS] += 3.0
        return logits

    def prefill(self, tokens: Sequence[int], reuse: bool = True,
                pixels: Sequence[Pixels] = ()) -> npt.NDArray[np.float32]:
        self.calls = [list(tokens)]
        return self._logits()

    def extend(self, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        self.calls.append(list(tokens))
        return self._logits()


class TurnsModel(ByteModel):
    """Answers each model turn (each prefill) with the next script; the last one repeats."""

    def __init__(self, *turns: bytes) -> None:
        super().__init__(script=turns[0])
        self.turns = [list(t) + [EOS] for t in turns]
        self.turn = -1
        self.prompts: list[str] = []

    def prefill(self, tokens: Sequence[int], reuse: bool = True,
                pixels: Sequence[Pixels] = ()) -> npt.NDArray[np.float32]:
        self.turn += 1
        self.script = self.turns[min(self.turn, len(self.turns) - 1)]
        self.prompts.append(bytes(t for t in tokens if t < 256).decode(errors="replace"))
        return super().prefill(tokens, reuse, pixels)


TEMPLATES = Path(__file__).parent / "templates"
SMOLLM3_TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<code>", "</code>"]  # added tokens


THINK, UNTHINK = 257, 258


class _ThinkingTokenizer(_ByteTokenizer):
    """The byte tokenizer plus `<think>` and `</think>` as special tokens, as in SmolLM3's vocabulary."""

    special_token_ids = [EOS, THINK, UNTHINK]
    tokens = [*_ByteTokenizer.tokens, b"\xff<think>", b"\xff</think>"]

    def __call__(self, data: bytes | str) -> list[int]:
        text = data.decode(errors="replace") if isinstance(data, bytes) else data
        special = {"<think>": THINK, "</think>": UNTHINK}
        return [special[text]] if text in special else list(text.encode())


def _with_think_tokens(script: bytes) -> list[int]:
    """A script's bytes as tokens, "<think>" and "</think>" as their special tokens, then EOS."""
    tokens: list[int] = []
    for i, part in enumerate(script.split(b"<think>")):
        tokens += [THINK] if i else []
        for j, piece in enumerate(part.split(b"</think>")):
            tokens += ([UNTHINK] if j else []) + list(piece)
    return tokens + [EOS]


class ThinkingModel(ByteModel):
    """A byte model with a SmolLM3-style template and think tokens: it thinks, lists tools itself and writes
    code in <code> tags. With `script` or `turns` (one script per model turn; "<think>" and "</think>" stand
    for their tokens) its outputs are exact; without, its random thoughts never close by themselves (only the
    budget ends them)."""

    name = "thinking-byte-model"
    n_vocab = 259
    chat_template = (TEMPLATES / "smollm3.jinja").read_text()

    def __init__(self, seed: int = 0, script: bytes | None = None, favour: bytes = b"ab ",
                 turns: tuple[bytes, ...] = (), silent_tags: bool = False) -> None:
        super().__init__(seed=seed, favour=favour)
        self.silent_tags = silent_tags  # the think tags' pieces render as nothing, as some control tokens do
        self.lltokenizer = LLTokenizer(TokenizerWrapper(_ThinkingTokenizer()))
        self.turns = [_with_think_tokens(t) for t in turns or ((script,) if script is not None else ())]
        self.script = self.turns[0] if self.turns else None
        self.prompts: list[str] = []

    def prefill(self, tokens: Sequence[int], reuse: bool = True,
                pixels: Sequence[Pixels] = ()) -> npt.NDArray[np.float32]:
        if self.turns:  # each model turn answers with the next script; the last one repeats
            self.script = self.turns[min(len(self.prompts), len(self.turns) - 1)]
        self.prompts.append(bytes(t for t in tokens if t < 256).decode(errors="replace"))
        return super().prefill(tokens, reuse, pixels)

    def token_bytes(self, token: int) -> bytes:
        if token in (THINK, UNTHINK):
            return b"" if self.silent_tags else {THINK: b"<think>", UNTHINK: b"</think>"}[token]
        return super().token_bytes(token)

    def _logits(self) -> npt.NDArray[np.float32]:
        logits = super()._logits()
        if self.script is None:
            logits[UNTHINK] = -10.0
        return logits


class BatchByteModel(_ByteVocab):
    """Implements backends.base.BatchModel over the byte tokenizer. A sequence's logits are a pure function
    of the tokens its cache holds (seeded noise plus a bias towards closing bytes and EOS), so a request
    decodes the same alone or in any batch; it checks every position the loop feeds and the cache's size."""

    name = "batch-byte-model"

    def __init__(self, n_seq: int = 4, n_ctx: int = 4096, n_batch: int = 32, seed: int = 0,
                 favour: bytes = b'"]}0') -> None:
        self.lltokenizer = byte_tokenizer()
        self.n_seq, self.n_ctx, self.n_batch = n_seq, n_ctx, n_batch
        self.seed = seed
        self.favour = list(favour)
        self.kv: list[list[int]] = [[] for _ in range(n_seq)]
        self.cells: list[list[int]] = [[] for _ in range(n_seq)]  # as llama.cpp's: shared ones are the same cell
        self.made = 0
        self.passes: list[list[Feed]] = []  # every forward pass, as fed
        self.shared: list[tuple[int, int, int, int]] = []  # every share(src, dst, start, end)

    def decode(self, feeds: Sequence[Feed]) -> list[npt.NDArray[np.float32]]:
        assert sum(len(f.tokens) for f in feeds) <= self.n_batch
        assert len({f.seq for f in feeds}) == len(feeds), "one feed per sequence and pass"
        if self.used() + sum(len(f.tokens) for f in feeds) > self.n_ctx:
            raise KVFull("full")
        out = []
        for feed in feeds:
            held = len(self.kv[feed.seq])
            assert feed.pos == held, f"sequence {feed.seq} fed at {feed.pos}, holds {held}"
            self.kv[feed.seq] += feed.tokens
            self.cells[feed.seq] += range(self.made, self.made + len(feed.tokens))
            self.made += len(feed.tokens)
            if feed.every:
                held = self.kv[feed.seq]
                out.append(np.stack([self._logits(held[:len(held) - len(feed.tokens) + k + 1])
                                     for k in range(len(feed.tokens))]))
            elif feed.logits:
                out.append(self._logits(self.kv[feed.seq]))
        self.passes.append(list(feeds))
        return out

    def _logits(self, history: list[int]) -> npt.NDArray[np.float32]:
        digest = zlib.crc32(np.asarray(history, dtype=np.uint16).tobytes())
        logits = np.random.default_rng([self.seed, digest]).normal(size=self.n_vocab).astype(np.float32)
        logits[self.favour] += 3.0
        logits[EOS] += 2.0
        return logits

    def used(self) -> int:
        return len({cell for cells in self.cells for cell in cells})

    def forget(self, seq: int, start: int) -> bool:
        del self.kv[seq][start:], self.cells[seq][start:]
        return True

    def share(self, src: int, dst: int, start: int, end: int) -> bool:
        assert len(self.kv[dst]) == start, f"sequence {dst} shares from {start}, holds {len(self.kv[dst])}"
        assert end <= len(self.kv[src]), f"sequence {src} shares up to {end}, holds {len(self.kv[src])}"
        self.kv[dst] += self.kv[src][start:end]
        self.cells[dst] += self.cells[src][start:end]
        self.shared.append((src, dst, start, end))
        return True

    def evaluate_tile(self, seq: int, tile: object, at: int) -> None:
        raise AssertionError("the byte model cannot see")


class BatchThinkingModel(BatchByteModel):
    """The batch byte model with think tokens and a SmolLM3-style template, as ThinkingModel is for one sequence;
    its random thoughts never close by themselves (only the budget ends them)."""

    name = "batch-thinking-model"
    n_vocab = 259
    chat_template = ThinkingModel.chat_template

    def __init__(self, **kwargs: object) -> None:
        super().__init__(favour=b"ab ", **kwargs)  # type: ignore[arg-type]
        self.lltokenizer = LLTokenizer(TokenizerWrapper(_ThinkingTokenizer()))

    def tokenize(self, text: str) -> list[int]:
        return self.lltokenizer.tokenize_str(text, parse_special=True)

    def token_bytes(self, token: int) -> bytes:
        if token in (THINK, UNTHINK):
            return b"" if self.silent_tags else {THINK: b"<think>", UNTHINK: b"</think>"}[token]
        return super().token_bytes(token)

    def _logits(self, history: list[int]) -> npt.NDArray[np.float32]:
        logits = super()._logits(history)
        logits[UNTHINK] = -10.0
        return logits
