"""SmolVLM's image side on llama.cpp, without torch: libmtmd (llama-cpp-python's bindings) cuts and encodes pictures
with the model's GGUF projector (mmproj); the prompt keeps SmolVLM's layout, with one placeholder image token per
embedding, so the decode loop, the grammar and prefix reuse work as for text."""

from __future__ import annotations

import ctypes
import io
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolrun.backends import smolvlm
from smolrun.backends.base import Pixels
from smolrun.errors import InvalidRequest, ModelUnavailable
from smolrun.media import MAX_FRAMES, digest
from smolrun.turn import Image, Video

Tile = tuple[Any, int]  # an mtmd image chunk and its number of image tokens


class _Chunks:
    """An mtmd_input_chunks list, freed with this object: the tiles of one picture or video borrow from it."""

    def __init__(self, mtmd: Any) -> None:
        self.ptr = mtmd.mtmd_input_chunks_init()
        if not self.ptr:
            raise MemoryError("mtmd_input_chunks_init failed")
        weakref.finalize(self, mtmd.mtmd_input_chunks_free, self.ptr)


@dataclass(frozen=True)
class Tiles:
    """One picture's (or video's) tiles, as mtmd image chunks, and the prompt position of each; encoded only when
    the KV cache does not hold them yet."""

    at: tuple[tuple[int, Tile], ...]  # (prompt position, tile); the chunks point into `owners`
    owners: tuple[_Chunks, ...]


class MtmdVision:
    """Pictures for a SmolVLM GGUF: libmtmd's tiles (a grid plus the overview, as SmolVLM's processor cuts them)
    and its text between them; `detail` low and each video frame show the overview alone."""

    def __init__(self, llama: Any, ctx: Any, mmproj: Path, *, threads: int, tokenize: Callable[[str], list[int]],
                 use_gpu: bool, n_batch: int) -> None:
        """`llama`: the model (llama-cpp-python's LlamaModel); `ctx`: the llama_context tiles are decoded into;
        `tokenize`: the model's prompt tokenizer (special tokens parsed, BOS added when the model wants it)."""
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd
        from llama_cpp._logger import llama_log_callback

        self._llama_cpp, self._mtmd, self._llama, self._llama_ctx = llama_cpp, mtmd, llama, ctx
        self._tokenize = tokenize
        self._n_batch = n_batch
        # Pictures are cut in request threads (prepare) and encoded on the engine's thread: one at a time.
        self._lock = threading.Lock()
        ids = {name: llama.tokenize(name.encode(), add_bos=False, special=True)
               for name in (smolvlm.IMAGE, smolvlm.AROUND, smolvlm.GLOBAL)}
        for name, found in ids.items():
            if len(found) != 1:
                raise ModelUnavailable(f"{mmproj.name}: smolrun's llama.cpp vision reads SmolVLM models, and this "
                                       f"model's vocabulary has no {name} token")
        (self.image_token_id,) = ids[smolvlm.IMAGE]
        mtmd.mtmd_log_set(llama_log_callback, None)  # llama.cpp's log level (quiet unless verbose)
        mtmd.mtmd_helper_log_set(llama_log_callback, None)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu  # where the text model's layers are
        params.print_timings = False
        params.n_threads = threads
        ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llama.model, params)
        if not ctx:
            raise ModelUnavailable(f"could not load the vision projector {mmproj} (not an mmproj GGUF for this "
                                   "model, or a projector type this llama.cpp does not know)")
        self._ctx = ctx
        self.close = weakref.finalize(self, mtmd.mtmd_free, ctx)  # called at most once: by close or by GC
        if not mtmd.mtmd_support_vision(ctx) or mtmd.mtmd_decode_use_mrope(ctx):
            raise ModelUnavailable(f"{mmproj.name}: smolrun's llama.cpp vision reads SmolVLM projectors only")

    def _cut(self, data: bytes) -> tuple[_Chunks, list[str | Tile]]:
        """mtmd's layout of one picture, in order: text, or a tile (an image chunk and its token count)."""
        from PIL import Image as PILImage

        mtmd = self._mtmd
        with PILImage.open(io.BytesIO(data)) as picture:
            rgb = picture.convert("RGB")
        pixels = bytearray(rgb.tobytes())
        bitmap = mtmd.mtmd_bitmap_init(rgb.width, rgb.height, (ctypes.c_uint8 * len(pixels)).from_buffer(pixels))
        if not bitmap:
            raise MemoryError("mtmd_bitmap_init failed")
        owner = _Chunks(mtmd)
        try:
            marker = mtmd.mtmd_default_marker()
            text = mtmd.mtmd_input_text(marker, len(marker), False, True)
            status = mtmd.mtmd_tokenize(self._ctx, owner.ptr, ctypes.byref(text),
                                        (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        if status != 0:
            raise InvalidRequest(f"llama.cpp could not prepare a picture of {rgb.width}x{rgb.height} (mtmd error "
                                 f"{status})", param="messages")
        segments: list[str | Tile] = []
        for i in range(mtmd.mtmd_input_chunks_size(owner.ptr)):
            chunk = mtmd.mtmd_input_chunks_get(owner.ptr, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = ctypes.c_size_t()
                ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                piece: bytes = self._llama.detokenize([ids[j] for j in range(count.value)], special=True)
                segments.append(piece.decode("utf-8"))
            else:
                segments.append((chunk, int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))))
        return owner, segments

    def _overview(self, data: bytes) -> tuple[_Chunks, list[str | Tile]]:
        """The picture whole: mtmd puts the overview after the grid, as SmolVLM does."""
        owner, segments = self._cut(data)
        overview = [s for s in segments if isinstance(s, tuple)][-1]
        return owner, [smolvlm.AROUND + smolvlm.GLOBAL, overview, smolvlm.AROUND]

    def _layout(self, item: Image | Video) -> tuple[list[_Chunks], list[str | Tile]]:
        if isinstance(item, Image):
            owner, segments = self._cut(item.data) if item.detail != "low" else self._overview(item.data)
            return [owner], segments
        frames = smolvlm.video_frames(item, MAX_FRAMES)
        owners, segments = [], [smolvlm.video_intro(len(frames), item.duration)]
        for data, second in frames:
            owner, frame = self._overview(data)
            owners.append(owner)
            segments += [smolvlm.frame_stamp(second), *frame]
        return owners, [*segments, smolvlm.MEDIA_OUTTRO]

    def prompt(self, text: str, media: Sequence[Image | Video]) -> tuple[list[int], tuple[Pixels, ...]]:
        pieces = smolvlm.split_prompt(text, len(media))
        with self._lock:
            layouts = [self._layout(item) for item in media]
        blocks = ["".join(s if isinstance(s, str) else smolvlm.IMAGE * s[1] for s in segments)
                  for _, segments in layouts]
        tokens = self._tokenize(smolvlm.join_prompt(pieces, blocks))
        tiles = [[s for s in segments if isinstance(s, tuple)] for _, segments in layouts]
        starts = iter(smolvlm.tile_starts(tokens, self.image_token_id, [size for t in tiles for _, size in t]))
        pixels = []
        for item, (owners, _), shown in zip(media, layouts, tiles, strict=True):
            at = tuple((next(starts), tile) for tile in shown)
            (start, _), (last, (_, size)) = at[0], at[-1]
            pixels.append(Pixels(start, last + size, Tiles(at, tuple(owners)), digest(item)))
        return tokens, tuple(pixels)

    def evaluate(self, tile: Tile, seq: int, at: int) -> None:
        """Encode a tile and decode its embeddings into sequence `seq` of the KV cache at position `at`."""
        llama_cpp, mtmd = self._llama_cpp, self._mtmd
        chunk, size = tile
        end = llama_cpp.llama_pos(0)
        with self._lock:
            status = mtmd.mtmd_helper_eval_chunk_single(self._ctx, self._llama_ctx, chunk, llama_cpp.llama_pos(at),
                                                        llama_cpp.llama_seq_id(seq), self._n_batch, False,
                                                        ctypes.byref(end))
        if status != 0 or end.value != at + size:
            raise RuntimeError(f"llama.cpp could not encode a picture (mtmd error {status})")
