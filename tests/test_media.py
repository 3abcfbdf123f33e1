"""Reading pictures, PDFs and videos from request bytes: what is accepted, what is resized, what is a 400."""

from __future__ import annotations

import base64
import io

import pytest

pytest.importorskip("PIL", reason="pictures need Pillow: `make test` installs it")
pytest.importorskip("pypdfium2", reason="PDFs need pypdfium2: `make test` installs it")
av = pytest.importorskip("av", reason="videos need PyAV: `make test` installs it")

import numpy as np  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from smolrun import media  # noqa: E402
from smolrun.errors import InvalidRequest  # noqa: E402
from smolrun.turn import Image, Video  # noqa: E402


def picture(size: tuple[int, int] = (150, 100), fmt: str = "PNG", color: str = "red") -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


def pdf(pages: int) -> bytes:
    out = io.BytesIO()
    first, *rest = [PILImage.new("RGB", (200, 280), c) for c in ["white", "gray", "black"] * pages][:pages]
    first.save(out, format="PDF", save_all=True, append_images=rest)
    return out.getvalue()


def video(seconds: float, fps: int = 4, size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(int(seconds * fps)):
            pixels = np.full((size[1], size[0], 3), (i * 9) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def test_a_picture_is_kept_as_sent_with_its_detail() -> None:
    data = picture(fmt="JPEG")
    (item,) = media.load(data, "x", "low")
    assert item == Image(data, "low")


def test_larger_pictures_are_downscaled_not_refused() -> None:
    (item,) = media.load(picture((5000, 1000)), "x")
    assert isinstance(item, Image)
    with PILImage.open(io.BytesIO(item.data)) as shown:
        assert shown.size == (media.MAX_EDGE, 819)


def test_every_pdf_page_becomes_a_picture() -> None:
    pages = media.load(pdf(3), "x", "high")
    assert len(pages) == 3 and all(isinstance(p, Image) and p.detail == "high" for p in pages)
    with PILImage.open(io.BytesIO(pages[0].data)) as first:  # rendered at 144 dpi from 200 x 280 points
        assert first.size == (400, 560)


def test_a_pdf_over_the_page_limit_is_refused_naming_the_part() -> None:
    with pytest.raises(InvalidRequest, match="17 pages") as err:
        media.load(pdf(media.MAX_PDF_PAGES + 1), "input[0].content[1]")
    assert err.value.param == "input[0].content[1]"


@pytest.mark.parametrize(("seconds", "frames"), [(5, 5), (2.5, 2), (0.5, 1), (90, media.MAX_FRAMES)])
def test_video_frames_are_at_most_one_a_second_and_capped(seconds: float, frames: int) -> None:
    (item,) = media.load(video(seconds, fps=2 if seconds > 10 else 4), "x")
    assert isinstance(item, Video) and len(item.frames) == frames == len(item.seconds)
    gaps = np.diff(item.seconds)
    assert (gaps >= 1.0 - 1e-6).all()
    assert item.duration == pytest.approx(seconds, abs=0.5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"just some text, not a picture", "known format"),
        (picture()[:60], "corrupt or truncated"),
        (b"%PDF-1.4 garbage", "not a readable PDF"),
        (video(2)[:300], "not a readable video"),
    ],
)
def test_corrupt_or_unknown_files_are_400s_naming_the_part(data: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as err:
        media.load(data, "messages[0].content[2]")
    assert err.value.param == "messages[0].content[2]" and err.value.status == 400


def test_data_urls_decode_and_network_urls_are_refused() -> None:
    data = picture()
    assert media.decode_url(data_url(data), "p") == data
    with pytest.raises(InvalidRequest, match="offline"):
        media.decode_url("https://example.com/cat.png", "p")
    for bad in ("data:image/png,notbase64", "data:image/png;base64,@@@", "ftp://x", "cat.png"):
        with pytest.raises(InvalidRequest):
            media.decode_url(bad, "p")


def test_detail_must_be_low_high_or_auto() -> None:
    assert media.check_detail(None, "d") == "auto"
    with pytest.raises(InvalidRequest, match="'low', 'high' or 'auto'"):
        media.check_detail("medium", "d")


def test_media_is_told_from_other_files() -> None:
    assert media.is_media(picture()) and media.is_media(pdf(1)) and media.is_media(video(1))
    assert not media.is_media(b"a,b\n1,2\n") and not media.is_media(b"")
