"""SmolVLM's image side on transformers: pictures into tiles (the PIL image processor, no torchvision) and the
image-token text that stands for them in the prompt, following SmolVLM's processor rules."""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from smolrun.backends.base import Pixels
from smolrun.errors import BackendMissing, InvalidRequest
from smolrun.media import digest
from smolrun.turn import Image, Video


class SmolVLMVision:
    """Splits a picture into square tiles of the vision encoder's side plus a global view (`detail` low: the
    global view only); a video is one tile per frame, introduced by its length and each frame's time."""

    def __init__(self, processor: Any, config: Any, tokenizer: Any) -> None:
        try:
            from num2words import num2words
            from transformers.models.smolvlm import processing_smolvlm
        except ImportError as exc:
            raise BackendMissing("SmolVLM needs num2words: pip install 'smolrun[vision]'") from exc
        self._num2words = num2words
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
        step = max(1, -(-len(item.frames) // self.max_frames))  # a model with fewer frames gets every k-th
        frames = list(zip(item.frames, item.seconds, strict=True))[::step]
        smolvlm = self._smolvlm
        text = smolvlm.DEFAULT_VIDEO_INTRO.format(frame_count=self._num2words(len(frames)),
                                                  video_duration=str(timedelta(seconds=int(item.duration))))
        tiles = []
        for data, second in frames:
            frame, _, _ = self._tiles(data, split=False)
            tiles.append(frame)
            stamp = f"{int(second // 60):02d}:{int(second % 60):02d}"
            text += smolvlm.FRAME_TIMESTAMP_MESSAGE.format(timestamp=stamp) + self._block(0, 0)
        return text + smolvlm.DEFAULT_MEDIA_OUTTRO, torch.cat(tiles)

    def prompt(self, text: str, media: Sequence[Image | Video]) -> tuple[list[int], tuple[Pixels, ...]]:
        pieces = text.split(self.image_token)
        if len(pieces) != len(media) + 1:
            raise InvalidRequest(f"the text of the messages must not contain {self.image_token!r}: it marks where "
                                 "pictures go", param="messages")
        encoded = [self.encode(item) for item in media]
        expanded = pieces[0] + "".join(block + piece for (block, _), piece in zip(encoded, pieces[1:], strict=True))
        tokens: list[int] = self._tokenizer(expanded, add_special_tokens=False)["input_ids"]
        positions = [i for i, t in enumerate(tokens) if t == self.image_token_id]
        pixels, at = [], 0
        for item, (_, tiles) in zip(media, encoded, strict=True):
            count = int(tiles.shape[0]) * self.tokens_per_tile
            span = positions[at : at + count]
            pixels.append(Pixels(span[0], span[-1] + 1, tiles, digest(item)))
            at += count
        if at != len(positions):  # the tokenizer must keep every image token whole
            raise RuntimeError(f"{len(positions)} image tokens in the prompt for {at} tile tokens")
        return tokens, tuple(pixels)
