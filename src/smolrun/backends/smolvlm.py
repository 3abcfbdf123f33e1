"""SmolVLM's prompt layout for pictures and videos, shared by both engines: the strings its processor writes
around image tokens, which the model was trained on (tests compare them with transformers' own)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from smolrun.errors import BackendMissing, InvalidRequest
from smolrun.turn import Video

IMAGE = "<image>"  # what SmolVLM's chat template writes for a picture part, and the image token itself
AROUND = "<fake_token_around_image>"
GLOBAL = "<global-img>"
VIDEO_INTRO = "You are provided the following series of {frame_count} frames from a {video_duration} [H:MM:SS] video.\n"
FRAME_STAMP = "\nFrame from {timestamp}:"
MEDIA_OUTTRO = "\n\n"


def video_frames(item: Video, max_frames: int) -> list[tuple[bytes, float]]:
    """The frames a model with at most `max_frames` frames sees: every k-th, with its time."""
    step = max(1, -(-len(item.frames) // max_frames))
    return list(zip(item.frames, item.seconds, strict=True))[::step]


def video_intro(frame_count: int, duration: float) -> str:
    try:
        from num2words import num2words
    except ImportError as exc:
        raise BackendMissing("SmolVLM's video prompt needs num2words: pip install 'smolrun[vision]'") from exc
    return VIDEO_INTRO.format(frame_count=num2words(frame_count), video_duration=str(timedelta(seconds=int(duration))))


def frame_stamp(second: float) -> str:
    return FRAME_STAMP.format(timestamp=f"{int(second // 60):02d}:{int(second % 60):02d}")


def split_prompt(text: str, pictures: int) -> list[str]:
    """The rendered prompt's text around its picture markers (one per picture)."""
    pieces = text.split(IMAGE)
    if len(pieces) != pictures + 1:
        raise InvalidRequest(f"the text of the messages must not contain {IMAGE!r}: it marks where pictures go",
                             param="messages")
    return pieces


def join_prompt(pieces: Sequence[str], blocks: Sequence[str]) -> str:
    """The prompt with each picture's block (its text and image tokens) in place of its marker; tokenized whole,
    as SmolVLM's processor does, so text around a block gets the same tokens on every engine."""
    return pieces[0] + "".join(block + piece for block, piece in zip(blocks, pieces[1:], strict=True))


def tile_starts(tokens: Sequence[int], image_token_id: int, sizes: Sequence[int]) -> list[int]:
    """Where each tile's run of image tokens starts in the prompt (`sizes`: the image tokens of each tile)."""
    positions = [i for i, t in enumerate(tokens) if t == image_token_id]
    starts, at = [], 0
    for size in sizes:
        run = positions[at : at + size]
        if len(run) != size or run[-1] - run[0] != size - 1:
            raise RuntimeError(f"the prompt's image tokens do not make a run of {size} for a tile")
        starts.append(run[0])
        at += size
    if at != len(positions):  # the tokenizer must keep every image token whole
        raise RuntimeError(f"{len(positions)} image tokens in the prompt for {at} tile tokens")
    return starts
