"""GGUF models through llama-cpp-python: our own decode loop over `eval` and the raw logits; with a vision
projector (mmproj), pictures through libmtmd (backends/mtmd.py)."""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from llguidance import LLTokenizer

from smolrun.backends.base import Pixels, Vision, reusable_prefix, reusable_with_pixels
from smolrun.backends.mtmd import MtmdVision
from smolrun.errors import BackendMissing


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise BackendMissing(
            "the llama.cpp engine needs llama-cpp-python: pip install 'smolrun[llama]' (or run `make setup`)"
        ) from exc
    return llama_cpp


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class LlamaCppModel:
    """One GGUF model with one KV-cache sequence; not thread-safe (the scheduler serialises use)."""

    def __init__(self, path: Path, *, name: str, n_ctx: int = 8192, n_threads: int | None = None,
                 mmproj: Path | None = None) -> None:
        llama_cpp = _import_llama_cpp()
        from llguidance.llamacpp import lltokenizer_from_vocab

        threads = n_threads or default_threads()
        self.llama = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            verbose=False,
        )
        self._lib = llama_cpp
        self.name = name
        self.path = path
        self.n_ctx = self.llama.n_ctx()
        self.n_vocab = self.llama.n_vocab()
        vocab = llama_cpp.llama_model_get_vocab(self.llama.model)
        self.eog_tokens = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t))
        with warnings.catch_warnings():  # llguidance calls a llama.cpp symbol deprecated in 0.3.36
            warnings.simplefilter("ignore", DeprecationWarning)
            self.lltokenizer: LLTokenizer = lltokenizer_from_vocab(vocab, eos_token=sorted(self.eog_tokens))
        self._pieces = [self.llama.detokenize([t], special=False) for t in range(self.n_vocab)]
        meta = self.llama.metadata
        self.chat_template: str | None = meta.get("tokenizer.chat_template")
        self.bos_token = self._piece_text(self.llama.token_bos())
        self.eos_token = self._piece_text(self.llama.token_eos())
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab)) and self.llama.token_bos() >= 0
        self._pixels: list[Pixels] = []  # the pictures whose embeddings the KV cache holds (without their tiles)
        self._mtmd: MtmdVision | None = None
        if mmproj is not None:
            self._mtmd = MtmdVision(self.llama, mmproj, threads=threads, tokenize=self.tokenize)
        self.vision: Vision | None = self._mtmd

    def _piece_text(self, token: int) -> str:
        if token < 0:
            return ""
        piece: bytes = self.llama.detokenize([token], special=True)
        return piece.decode("utf-8", errors="replace")

    def tokenize(self, text: str) -> list[int]:
        tokens: list[int] = self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        bos = self.llama.token_bos()
        if self._add_bos and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)
        return tokens

    def token_bytes(self, token: int) -> bytes:
        return self._pieces[token] if 0 <= token < self.n_vocab else b""

    def prefill(self, tokens: Sequence[int], reuse: bool = True,
                pixels: Sequence[Pixels] = ()) -> npt.NDArray[np.float32]:
        if pixels and self._mtmd is None:
            raise ValueError(f"{self.name} cannot see: it got pictures")
        common = reusable_prefix(self.llama.input_ids[: self.llama.n_tokens], tokens) if reuse else 0
        common = reusable_with_pixels(common, self._pixels, pixels)
        # Sliding-window caches (Gemma 3) cannot always drop a suffix: then start over from an empty cache.
        if common > 0 and not self.llama._ctx.kv_cache_seq_rm(-1, common, -1):
            common = 0
        self.llama.n_tokens = common  # eval() drops the KV cache past n_tokens before decoding
        kept, new = [p for p in self._pixels if p.end <= common], [p for p in pixels if p.start >= common]
        self._pixels = kept  # a picture counts as cached once all its tiles are: an error midway leaves it out
        at = common
        for tiles in (p.values for p in new):
            for start, tile in tiles.at:
                self.llama.eval(tokens[at:start])  # the text before the tile (the first call drops the cache's rest)
                self._mtmd.evaluate(tile, start)  # type: ignore[union-attr]
                at = start + tile[1]
                self.llama.input_ids[start:at] = tokens[start:at]
                self.llama.n_tokens = at
        # What a picture was is kept for reuse, not its tiles (float pixels): they go with the request.
        self._pixels = kept + [replace(p, values=None) for p in new]
        return self.extend(tokens[at:])  # never empty: SmolVLM's layout closes every picture with a token

    def extend(self, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        self.llama.eval(list(tokens))
        ptr = self.llama._ctx.get_logits_ith(-1)
        # A view into llama.cpp's buffer: valid until the next eval, which is all the loop needs.
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))
