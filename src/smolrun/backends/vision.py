"""SmolVLM's image side on transformers: pictures into tiles (the PIL image processor, no torchvision) and the
image-token text that stands for them in the prompt, following SmolVLM's processor rules."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from smolrun.backends import smolvlm
from smolrun.backends.base import Pixels
from smolrun.media import digest
from smolrun.turn import Image, Video


class SmolVLMVision:
    """Splits a picture into square tiles of the vision encoder's side plus a global view (`detail` low: the
    global view only); a video is one tile per frame, introduced by its length and each frame's time."""

    def __init__(self, processor: Any, config: Any, tokenizer: Any) -> None:
        from transformers.models.smolvlm import processing_smolvlm

        self._smolvlm = processing_smolvlm
        self._tokenizer = tokenizer
        self.processor = processor
        self.tile = int(processor.max_image_size["longest_edge"])
        vision = config.vision_config
        self.tokens_per_tile = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
        self.image_token_id = int(config.image_token_id)
        self.image_token = str(tokenizer.convert_ids_to_tokens(self.image_token_id))
        sampling = getattr(processor, "video_sampling", None) or {}
        self.max_frames = int(sampling.get("max_frames", 64))

    def _tiles(self, data: bytes, split: bool) -> tuple[Any, int, int]:
        from PIL import Image as PILImage

        with PILImage.open(io.BytesIO(data)) as picture:
            rgb = picture.convert("RGB")
        out = self.processor([[rgb]], do_image_splitting=split, return_row_col_info=True, return_tensors="pt")
        return out["pixel_values"][0], int(out["rows"][0][0]), int(out["cols"][0][0])

    def _block(self, rows: int, cols: int) -> str:
        return str(self._smolvlm.get_image_prompt_string(  # type: ignore[no-untyped-call]
            rows, cols, self.tokens_per_tile, fake_token_around_image="<fake_token_around_image>",
            image_token=self.image_token, global_image_token="<global-img>"))

    def encode(self, item: Image | Video) -> tuple[str, Any]:
        """The prompt text standing for `item` and its tiles, (tiles, 3, side, side)."""
        import torch

        if isinstance(item, Image):
            tiles, rows, cols = self._tiles(item.data, split=item.detail != "low")
            return self._block(rows, cols), tiles
        frames = smolvlm.video_frames(item, self.max_frames)
        text = smolvlm.video_intro(len(frames), item.duration)
        tiles = []
        for data, second in frames:
            frame, _, _ = self._tiles(data, split=False)
            tiles.append(frame)
            text += smolvlm.frame_stamp(second) + self._block(0, 0)
        return text + smolvlm.MEDIA_OUTTRO, torch.cat(tiles)

    def prompt(self, text: str, media: Sequence[Image | Video]) -> tuple[list[int], tuple[Pixels, ...]]:
        pieces = smolvlm.split_prompt(text, len(media))
        encoded = [self.encode(item) for item in media]
        tokens: list[int] = self._tokenizer(smolvlm.join_prompt(pieces, [block for block, _ in encoded]),
                                            add_special_tokens=False)["input_ids"]
        counts = [int(tiles.shape[0]) for _, tiles in encoded]
        starts = smolvlm.tile_starts(tokens, self.image_token_id, [self.tokens_per_tile] * sum(counts))
        pixels, at = [], 0
        for item, (_, tiles), count in zip(media, encoded, counts, strict=True):
            pixels.append(Pixels(starts[at], starts[at + count - 1] + self.tokens_per_tile, tiles, digest(item)))
            at += count
        return tokens, tuple(pixels)
