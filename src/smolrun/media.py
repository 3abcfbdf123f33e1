"""Pictures, PDF pages and video frames from request bytes: decoded once to check them, capped, kept encoded.

Pillow, pypdfium2 and PyAV are imported only when a request carries media (extra `smolrun[vision]`). Every
failure is an InvalidRequest naming the request part (`where`), so a bad file answers 400, never 500.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import re
from collections.abc import Callable
from typing import Any

from smolrun.errors import BackendMissing, InvalidRequest, first_line
from smolrun.turn import Detail, Image, Message, Part, Role, Video

Files = Callable[[str], bytes]  # an uploaded file's id -> its bytes (NotFound when there is none)

MAX_EDGE = 4096  # larger pictures are downscaled to this longest side (SmolVLM's processors use at most 2048)
MAX_PDF_PAGES = 16  # more is refused rather than silently dropped
PDF_SCALE = 2.0  # 144 dpi: an A4 page becomes 1190 x 1684 pixels, enough for 8-point text
MAX_FRAMES = 64  # SmolVLM2's video_sampling.max_frames
FRAME_EDGE = 768  # frames are shown as one tile each (384 or 512 pixels): larger only costs memory
DETAILS = ("low", "high", "auto")


def _pil() -> Any:
    try:
        from PIL import Image as PILImage
    except ImportError as exc:
        raise BackendMissing("reading images needs Pillow: pip install 'smolrun[vision]'") from exc
    return PILImage


def decode_url(url: str, where: str) -> bytes:
    """The bytes of a `data:` URL. http(s) URLs are refused: the server never fetches from the network."""
    if url.startswith(("http://", "https://")):
        raise InvalidRequest(f"{where}: this server works offline and does not fetch URLs; send the file as a "
                             "data URL (data:image/png;base64,...) or upload it and send its file_id", param=where)
    if not url.startswith("data:") or "," not in url:
        raise InvalidRequest(f"{where}: expected a data URL (data:<type>;base64,<data>)", param=where)
    header, payload = url[5:].split(",", 1)
    if not header.endswith(";base64"):
        raise InvalidRequest(f"{where}: data URLs must be base64-encoded (data:<type>;base64,...)", param=where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}: the data URL is not valid base64", param=where) from None


def message(role: Role, parts: list[Part], where: str) -> Message:
    """A message from request content parts; pictures belong in user messages only."""
    if role != "user" and any(not isinstance(p, str) for p in parts):
        raise InvalidRequest("pictures go in user messages", param=where)
    return Message.of(role, parts)


def check_detail(detail: Any, where: str) -> Detail:
    if detail is None:
        return "auto"
    if detail not in DETAILS:
        raise InvalidRequest(f"{where}: 'detail' must be 'low', 'high' or 'auto', not {detail!r}", param=where)
    return detail  # type: ignore[no-any-return]


def load(data: bytes, where: str, detail: Detail = "auto") -> list[Image | Video]:
    """What a file shows: one picture, a PDF's pages, or a video's frames."""
    if data.startswith(b"%PDF-"):
        return list(pdf_pages(data, where, detail))
    if _is_video(data):
        return [video(data, where)]
    return [image(data, where, detail)]


def image(data: bytes, where: str, detail: Detail = "auto") -> Image:
    PILImage = _pil()
    try:
        with PILImage.open(io.BytesIO(data)) as picture:
            picture.load()  # decodes every pixel: truncated and corrupt files fail here, not in the model
            if max(picture.size) <= MAX_EDGE:
                return Image(data, detail)
            picture.thumbnail((MAX_EDGE, MAX_EDGE))
            return Image(png(picture), detail)
    except PILImage.DecompressionBombError:
        raise InvalidRequest(f"{where}: the image has too many pixels to decode safely", param=where) from None
    except PILImage.UnidentifiedImageError:
        raise InvalidRequest(f"{where}: not a picture, PDF or video in a known format", param=where) from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise InvalidRequest(f"{where}: a corrupt or truncated image ({_reason(exc)})", param=where) from None


def png(picture: Any) -> bytes:
    out = io.BytesIO()
    picture.convert("RGB").save(out, format="PNG")
    return out.getvalue()


def pdf_pages(data: bytes, where: str, detail: Detail = "auto") -> list[Image]:
    try:
        import pypdfium2 as pdfium
    except ImportError as exc:
        raise BackendMissing("reading PDFs needs pypdfium2: pip install 'smolrun[vision]'") from exc
    try:
        document = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        raise InvalidRequest(f"{where}: not a readable PDF ({_reason(exc)})", param=where) from None
    try:
        if len(document) > MAX_PDF_PAGES:
            raise InvalidRequest(f"{where}: the PDF has {len(document)} pages; at most {MAX_PDF_PAGES} are read "
                                 "per file, so split it", param=where)
        if len(document) == 0:
            raise InvalidRequest(f"{where}: the PDF has no pages", param=where)
        return [Image(png(document[i].render(scale=PDF_SCALE).to_pil()), detail) for i in range(len(document))]
    finally:
        document.close()


def _is_video(data: bytes) -> bool:
    head = data[:16]
    return (head[4:8] == b"ftyp" and head[8:12] not in (b"avif", b"avis", b"heic", b"heix", b"mif1")
            or head.startswith(b"\x1a\x45\xdf\xa3")  # Matroska / WebM
            or head.startswith(b"RIFF") and head[8:12] == b"AVI ")


def video(data: bytes, where: str, max_frames: int = MAX_FRAMES) -> Video:
    """Frames at most one per second, evenly spread, `max_frames` at most (SmolVLM2's sampling)."""
    try:
        import av
    except ImportError as exc:
        raise BackendMissing("reading videos needs PyAV: pip install 'smolrun[vision]'") from exc
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise InvalidRequest(f"{where}: the file has no video stream", param=where)
            stream = container.streams.video[0]
            duration = _duration(container, stream)
            count = max(1, min(max_frames, math.floor(duration)))  # 1 frame per second at most
            targets = [duration * i / count for i in range(count)]
            frames: list[bytes] = []
            seconds: list[float] = []
            for target in targets:  # seek to each time: a long video is not decoded whole
                if stream.time_base is not None:
                    container.seek(int(target / stream.time_base), stream=stream, backward=True)
                for frame in container.decode(stream):
                    at = float(frame.time or 0.0)
                    if at + 1e-6 < target:
                        continue
                    if not seconds or at > seconds[-1]:  # a sparse video can give one frame for two times
                        picture = frame.to_image()  # type: ignore[no-untyped-call]
                        picture.thumbnail((FRAME_EDGE, FRAME_EDGE))
                        frames.append(_jpeg(picture))
                        seconds.append(at)
                    break
    except av.FFmpegError as exc:
        raise InvalidRequest(f"{where}: not a readable video ({_reason(exc)})", param=where) from None
    if not frames:
        raise InvalidRequest(f"{where}: the video has no decodable frames", param=where)
    return Video(tuple(frames), tuple(seconds), max(duration, seconds[-1]))


def _duration(container: Any, stream: Any) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000  # av.time_base
    return 0.0


def _jpeg(picture: Any) -> bytes:
    out = io.BytesIO()
    picture.convert("RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def digest(item: Image | Video) -> bytes:
    """Identifies a picture (and how it is cut) for KV-cache reuse."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(item, Image):
        h.update(item.detail.encode())
        h.update(item.data)
    else:
        for frame in item.frames:
            h.update(frame)
    return h.digest()


def _reason(exc: BaseException) -> str:
    text = first_line(exc)
    text = re.sub(r"^\[Errno -?\d+\] |: '<none>'$", "", text)  # FFmpeg's errno prefix and missing file name
    return text[:200]


def is_media(data: bytes) -> bool:
    """Whether a file is a picture, a PDF or a video (by its first bytes; a picture only if Pillow knows it)."""
    if data.startswith(b"%PDF-") or _is_video(data):
        return True
    try:
        PILImage = _pil()
        with PILImage.open(io.BytesIO(data)):
            return True
    except (BackendMissing, OSError, ValueError, SyntaxError):
        return False
