"""GGUF models through llama.cpp (llama-cpp-python's bindings): one context holding many sequences, driven one
batch at a time by the batch loop (backends/batch.py); with a vision projector (mmproj), pictures through libmtmd
(backends/mtmd.py)."""

from __future__ import annotations

import ctypes
import os
import time
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from llguidance import LLTokenizer

from smolrun.backends.base import Feed, KVFull, Vision
from smolrun.backends.mtmd import MtmdVision, Tile
from smolrun.errors import BackendMissing, ModelUnavailable

N_BATCH = 512  # tokens in one forward pass (llama.cpp's n_batch and n_ubatch)
_backend_ready = False


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise BackendMissing(
            "the llama.cpp engine needs llama-cpp-python: pip install 'smolrun[llama]' (or run `make setup`)"
        ) from exc
    global _backend_ready
    if not _backend_ready:
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's own log: errors only
        llama_cpp.llama_backend_init()
        _backend_ready = True
    return llama_cpp


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def idle_threads(sample_s: float = 0.1) -> int:
    """Threads for a one-shot run beside whatever already runs here: the CPUs idle over `sample_s`, at least 1.

    llama.cpp's threads spin while they wait for each other, so two processes that each take every core stall
    each other's passes: beside a busy server, a 2-thread `smolrun ask` took 12x its time alone, a 1-thread
    one under 2x (BENCHMARKS.md, cpu-share).
    """
    try:
        before = _cpu_jiffies()
        time.sleep(sample_s)
        after = _cpu_jiffies()
    except (OSError, ValueError, IndexError):  # no Linux /proc/stat: every CPU, as a server takes
        return default_threads()
    return threads_for_idle(before, after, os.cpu_count() or 1, default_threads())


def threads_for_idle(before: tuple[int, int], after: tuple[int, int], cpus: int, allowed: int) -> int:
    """From two (idle, total) jiffy counts of all `cpus`: the whole CPUs that were idle, within 1..`allowed`."""
    total = after[1] - before[1]
    idle = (after[0] - before[0]) / total * cpus if total > 0 else cpus
    return max(1, min(allowed, round(idle)))


def _cpu_jiffies() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs since boot, from /proc/stat; idle counts iowait too."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])  # user nice system idle iowait irq softirq steal


def default_gpu_layers() -> int:
    """All layers where this llama.cpp build can offload (CUDA, Metal, Vulkan), else none."""
    return -1 if _import_llama_cpp().llama_supports_gpu_offload() else 0


class LlamaCppModel:
    """One GGUF model in one llama.cpp context of `n_seq` sequences sharing a KV cache of `n_ctx` tokens.

    Not thread-safe: one thread drives it (the engine's batch thread, or the caller's in `smolrun ask`).
    Tokenizing reads only the model's vocabulary, which any thread may do."""

    def __init__(self, path: Path, *, name: str, n_ctx: int = 8192, n_threads: int | None = None,
                 mmproj: Path | None = None, n_seq: int = 4, gpu_layers: int | None = None) -> None:
        llama_cpp = _import_llama_cpp()
        from llama_cpp._internals import LlamaContext, LlamaModel
        from llguidance.llamacpp import lltokenizer_from_vocab

        threads = n_threads or default_threads()
        self.gpu_layers = default_gpu_layers() if gpu_layers is None else gpu_layers
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = self.gpu_layers
        if not path.is_file():
            raise ModelUnavailable(f"no model file at {path}")
        self._model = LlamaModel(path_model=str(path), params=model_params, verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = n_seq
        params.kv_unified = n_seq > 1  # one cache for all sequences: a long request may use all of it
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        # Flash attention: a batched pass of 8 sequences takes 80 ms instead of 101 on 2 CPU cores (SmolLM2); on
        # a GPU llama.cpp decides. (It rounds attention through f16, so logits differ from llama-cpp-python's
        # default Llama, which turns it off.)
        params.flash_attn_type = -1 if self.gpu_layers != 0 else 1
        self._context = LlamaContext(model=self._model, params=params, verbose=False)
        self.ctx = self._context.ctx
        self._memory = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self._free_batch = weakref.finalize(self, llama_cpp.llama_batch_free, self._batch)
        self._lib = llama_cpp
        model = self._model.model
        # Only a plain attention cache holds each position in a cell of its own that two sequences can share;
        # a sliding window drops old positions, and a recurrent state (Mamba, hybrids) is one state per sequence.
        self._can_share = not (llama_cpp.llama_model_n_swa(model) > 0 or llama_cpp.llama_model_is_recurrent(model)
                               or llama_cpp.llama_model_is_hybrid(model))
        self.name = name
        self.path = path
        self.n_seq = n_seq
        self.n_batch = N_BATCH
        self.n_threads = threads
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_vocab = self._model.n_vocab()
        self._row_type = ctypes.c_float * self.n_vocab
        vocab = self._model.vocab
        self.eog_tokens = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t))
        with warnings.catch_warnings():  # llguidance calls a llama.cpp symbol deprecated in 0.3.36
            warnings.simplefilter("ignore", DeprecationWarning)
            self.lltokenizer: LLTokenizer = lltokenizer_from_vocab(vocab, eos_token=sorted(self.eog_tokens))
        self._pieces = [self._model.detokenize([t], special=False) for t in range(self.n_vocab)]
        meta = self._model.metadata()
        self.chat_template: str | None = meta.get("tokenizer.chat_template")
        self.bos_token = self._piece_text(self._model.token_bos())
        self.eos_token = self._piece_text(self._model.token_eos())
        self._add_bos = self._model.add_bos_token() and self._model.token_bos() >= 0
        self._mtmd: MtmdVision | None = None
        if mmproj is not None:
            self._mtmd = MtmdVision(self._model, self.ctx, mmproj, threads=threads, tokenize=self.tokenize,
                                    use_gpu=self.gpu_layers != 0, n_batch=N_BATCH)
        self.vision: Vision | None = self._mtmd
        # What the model holds in memory: its weights, and its KV cache (f16 keys and values for every layer and
        # context position, the head size taken as the embedding over the heads, as in the models served here).
        heads = max(llama_cpp.llama_model_n_head(model), 1)
        kv_width = llama_cpp.llama_model_n_embd(model) // heads * llama_cpp.llama_model_n_head_kv(model)
        self.memory_bytes = int(llama_cpp.llama_model_size(model)) + (
            self.n_ctx * llama_cpp.llama_model_n_layer(model) * 2 * kv_width * 2)

    def close(self) -> None:
        """Free the projector, the context and the weights now, not when the collector gets to them (a server
        unloading a model loads another next). Nothing may use the model afterwards."""
        if self._mtmd is not None:
            self._mtmd.close()
        self._free_batch()
        self._context.close()  # type: ignore[no-untyped-call]
        self._model.close()  # type: ignore[no-untyped-call]

    def _piece_text(self, token: int) -> str:
        if token < 0:
            return ""
        piece: bytes = self._model.detokenize([token], special=True)
        return piece.decode("utf-8", errors="replace")

    def tokenize(self, text: str) -> list[int]:
        tokens: list[int] = self._model.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        bos = self._model.token_bos()
        if self._add_bos and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)
        return tokens

    def token_bytes(self, token: int) -> bytes:
        return self._pieces[token] if 0 <= token < self.n_vocab else b""

    def decode(self, feeds: Sequence[Feed]) -> list[npt.NDArray[np.float32]]:
        """One forward pass over every feed (at most n_batch tokens in all): the logits after each feed that
        asks for them, in order; views into llama.cpp's buffer, valid until the next pass. KVFull when the
        cache has no room (llama.cpp then drops what this pass added)."""
        batch = self._batch
        i = 0
        wanted: list[tuple[int, int]] = []  # (first token, rows) of each feed that asks for logits
        for feed in feeds:
            for j, token in enumerate(feed.tokens):
                batch.token[i] = token
                batch.pos[i] = feed.pos + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = feed.seq
                batch.logits[i] = feed.every
                i += 1
            if feed.every:
                wanted.append((i - len(feed.tokens), len(feed.tokens)))
            elif feed.logits:
                batch.logits[i - 1] = True
                wanted.append((i - 1, 0))
        batch.n_tokens = i
        status = self._lib.llama_decode(self.ctx, batch)
        if status == 1:
            raise KVFull(f"the KV cache of {self.n_ctx} tokens has no room for {i} more")
        if status != 0:
            where = ", ".join(f"sequence {f.seq} at {f.pos} (+{len(f.tokens)})" for f in feeds)
            raise RuntimeError(f"llama_decode failed ({status}) for {where}")
        out = []
        for first, rows in wanted:
            if rows:  # a copy: each row is asked for on its own (llama.cpp may hold outputs in another order)
                out.append(np.stack([self._row(first + r) for r in range(rows)]))
            else:
                out.append(self._row(first))
        return out

    def _row(self, index: int) -> npt.NDArray[np.float32]:
        """Output `index`'s logits, a view of llama.cpp's buffer (valid until the next decode)."""
        ptr = self._lib.llama_get_logits_ith(self.ctx, index)
        row: npt.NDArray[np.float32] = np.frombuffer(
            self._row_type.from_address(ctypes.addressof(ptr.contents)), dtype=np.float32)  # type: ignore[call-overload]
        return row

    def forget(self, seq: int, start: int) -> bool:
        """Drop sequence `seq` from position `start` on; False where the cache cannot (sliding windows)."""
        return bool(self._lib.llama_memory_seq_rm(self._memory, seq, start, -1))

    def share(self, src: int, dst: int, start: int, end: int) -> bool:
        """Sequence `dst` also holds `src`'s cells from `start` to `end` (llama.cpp tags the cells with both
        sequences, so nothing is copied); only on a plain attention cache."""
        if not self._can_share:
            return False
        self._lib.llama_memory_seq_cp(self._memory, src, dst, start, end)
        return True

    def evaluate_tile(self, seq: int, tile: Tile, at: int) -> None:
        assert self._mtmd is not None
        self._mtmd.evaluate(tile, seq, at)
