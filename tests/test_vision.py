"""Vision end to end on a tiny random SmolVLM (real SmolLM2 tokenizer plus SmolVLM's image tokens, the
library's SmolVLM chat template, the PIL image processor), on both engines: transformers, and llama.cpp with the
same weights turned into a GGUF and an mmproj by llama.cpp's own converter. Pictures, PDF pages and video frames
become image tokens and tiles, answers under a schema always validate, and the server routes by content."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import numpy.typing as npt
import openai
import pytest

pytest.importorskip("torch", reason="vision runs on the transformers engine: `make test` installs it")
pytest.importorskip("PIL", reason="pictures need Pillow: `make test` installs it")
pytest.importorskip("num2words", reason="SmolVLM's video prompt needs num2words: `make test` installs it")

from click.testing import CliRunner  # noqa: E402

from smolrun.backends.base import Pixels  # noqa: E402
from smolrun.backends.decode import Prepared  # noqa: E402
from smolrun.backends.transformers import TransformersModel  # noqa: E402
from smolrun.backends.vision import SmolVLMVision  # noqa: E402
from smolrun.cli import main  # noqa: E402
from smolrun.config import Settings  # noqa: E402
from smolrun.engine import Engine  # noqa: E402
from smolrun.errors import InvalidRequest  # noqa: E402
from smolrun.runner import observation  # noqa: E402
from smolrun.sandbox.container import Execution  # noqa: E402
from smolrun.turn import TEXT, Done, Image, Message, ResponseFormat, SamplingParams, TextDelta, Turn, Video  # noqa: E402
from tests.conftest import MAX_FRAMES, TILE, Server  # noqa: E402
from tests.fakes import ByteModel  # noqa: E402
from tests.test_media import data_url, pdf, picture, video  # noqa: E402

RECEIPT = {"type": "object", "properties": {"shop": {"type": "string", "maxLength": 20},
                                            "total": {"type": "number", "minimum": 0, "maximum": 1000}},
           "required": ["shop", "total"], "additionalProperties": False}


@pytest.fixture(scope="session")
def hf_vlm(tiny_smolvlm: Path) -> Engine:
    return Engine.load(Settings(backend="transformers", model=str(tiny_smolvlm), threads=2, n_ctx=4096))


@pytest.fixture(scope="session")
def gguf_vlm(tiny_smolvlm_gguf: Path) -> Engine:
    return Engine.load(Settings(model=str(tiny_smolvlm_gguf), threads=2, n_ctx=4096))


@pytest.fixture(scope="session", params=["transformers", "llama"])
def vlm(request: pytest.FixtureRequest) -> Engine:
    """The tiny SmolVLM on each engine: the tests that take it hold for both."""
    engine: Engine = request.getfixturevalue("hf_vlm" if request.param == "transformers" else "gguf_vlm")
    return engine


def vision_of(engine: Engine) -> SmolVLMVision:
    assert isinstance(engine.model, TransformersModel) and isinstance(engine.model.vision, SmolVLMVision)
    return engine.model.vision


def tile_count(pixels: Pixels) -> int:
    values: Any = pixels.values  # transformers: a tensor of tiles; llama.cpp: mtmd chunks at their positions
    return int(values.shape[0]) if hasattr(values, "shape") else len(values.at)


def ask(*parts: object, fmt: ResponseFormat = TEXT, seed: int | None = None) -> Turn:
    return Turn((Message.of("user", list(parts)),), fmt,  # type: ignore[arg-type]
                SamplingParams(max_tokens=60, temperature=1.0, seed=seed, frequency_penalty=0.5))


def answer(engine: Engine, turn: Turn) -> tuple[str, Done]:
    events = list(engine.generate(engine.prepare(turn)))
    done = events[-1]
    assert isinstance(done, Done)
    return "".join(e.text for e in events if isinstance(e, TextDelta)), done


def test_the_tiny_smolvlm_sees_and_gets_the_smolvlm_profile(vlm: Engine, hf_vlm: Engine) -> None:
    assert vlm.sees and vlm.profile.name == "smolvlm" and vlm.profile.content_parts
    assert vision_of(hf_vlm).tokens_per_tile == (TILE // 16) ** 2 // 2**2 == 4


def expected_tiles(engine: Engine, size: tuple[int, int], detail: str) -> int:
    """SmolVLM's rule, by transformers' own patch counter: no splitting for `low`, else tiles + a global view."""
    if detail == "low":
        return 1
    patches, _, _ = vision_of(engine).processor.get_number_of_image_patches(size[1], size[0])
    return max(1, patches)


@pytest.mark.parametrize("size", [(150, 100), (300, 60), (40, 40), (64, 200)])
@pytest.mark.parametrize("detail", ["low", "high", "auto"])
def test_image_tokens_per_picture_follow_the_processor_rules(vlm: Engine, hf_vlm: Engine, size: tuple[int, int],
                                                             detail: str) -> None:
    prepared = vlm.prepare(ask(Image(picture(size), detail), "Describe it."))  # type: ignore[arg-type]
    vision = vision_of(hf_vlm)
    tiles = expected_tiles(hf_vlm, size, detail)
    (pixels,) = prepared.pixels
    assert tile_count(pixels) == tiles
    if vlm is hf_vlm:
        assert pixels.values.shape == (tiles, 3, TILE, TILE)
    assert prepared.prompt.count(vision.image_token_id) == tiles * vision.tokens_per_tile
    assert pixels.end - pixels.start >= tiles * vision.tokens_per_tile


def test_a_150_by_100_picture_is_four_tiles_and_a_global_view(vlm: Engine) -> None:
    # 150 x 100 -> 128 x 85 (longest side 128) -> 2 x 2 tiles of 64, plus the global view: 5 x 4 tokens.
    text = vlm.model.lltokenizer.decode_str(vlm.prepare(ask(Image(picture()), "What?")).prompt)
    assert [m for m in re.findall(r"<row_\d_col_\d>", text)] == ["<row_1_col_1>", "<row_1_col_2>",
                                                                  "<row_2_col_1>", "<row_2_col_2>"]
    assert text.count("<global-img>") == 1 and text.count("<image>") == 20
    assert text.startswith("<|im_start|>User:<fake_token_around_image><row_1_col_1>")
    assert text.endswith("What?<end_of_utterance>\nAssistant:")


def test_several_pictures_keep_their_order_and_spans(vlm: Engine) -> None:
    first, second = Image(picture((150, 100), color="red"), "low"), Image(picture((40, 40), color="blue"))
    prepared = vlm.prepare(ask("Compare", first, "with", second))
    a, b = prepared.pixels
    assert a.end <= b.start and tile_count(a) == 1 and tile_count(b) == 5
    assert a.digest != b.digest
    text = vlm.model.lltokenizer.decode_str(prepared.prompt)
    assert text.index("Compare") < text.index("<global-img>") < text.index("with") < text.rindex("<global-img>")


def test_a_video_is_one_tile_per_frame_with_its_times(vlm: Engine) -> None:
    from smolrun import media

    clip = media.load(video(5), "clip")[0]
    assert isinstance(clip, Video)
    prepared = vlm.prepare(ask(clip, "What happens?"))
    text = vlm.model.lltokenizer.decode_str(prepared.prompt)
    assert "series of five frames from a 0:00:05 [H:MM:SS] video" in text
    assert re.findall(r"Frame from (\d\d:\d\d):", text) == ["00:00", "00:01", "00:02", "00:03", "00:04"]
    assert text.count("<global-img>") == 5 and tile_count(prepared.pixels[0]) == 5


def test_a_long_video_is_thinned_to_the_models_frame_limit(hf_vlm: Engine) -> None:
    frames = tuple(picture((32, 32)) for _ in range(20))
    clip = Video(frames, tuple(float(s) for s in range(20)), 20.0)
    text = hf_vlm.model.lltokenizer.decode_str(hf_vlm.prepare(ask(clip, "Summarise")).prompt)
    times = re.findall(r"Frame from (\d\d:\d\d):", text)
    assert len(times) == 7 <= MAX_FRAMES and times[:3] == ["00:00", "00:03", "00:06"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_picture_to_schema_json_always_validates(vlm: Engine, seed: int) -> None:
    fmt = ResponseFormat("json_schema", RECEIPT, "receipt", strict=True)
    text, done = answer(vlm, ask(Image(picture((120, 300))), "Extract the receipt.", fmt=fmt, seed=seed))
    assert done.finish_reason == "stop", text
    jsonschema.validate(json.loads(text), RECEIPT)


def test_prefix_reuse_keeps_equal_pictures_and_redoes_changed_ones(vlm: Engine, tiny_smolvlm_gguf: Path) -> None:
    red = vlm.prepare(ask(Image(picture(color="red")), "Say the colour."))
    blue = vlm.prepare(ask(Image(picture(color="blue")), "Say the colour."))
    assert red.prompt == blue.prompt  # equal tokens: only the pixels differ
    if vlm.batches:  # llama.cpp: the batch loop's prefix cache, as cached_tokens reports it, on one sequence
        one = Engine.load(Settings(model=str(tiny_smolvlm_gguf), threads=2, n_ctx=4096, parallel=1))

        def cached(color: str) -> int:
            prepared = one.prepare(ask(Image(picture(color=color)), "Say the colour."))
            done = [e for e in one.generate(replace(prepared, params=SamplingParams(max_tokens=1, temperature=0)))
                    if isinstance(e, Done)][0]
            return done.stats.cached_tokens

        cached("red")
        assert cached("red") == len(red.prompt) - 1  # all of it, less the last token (evaluated for fresh logits)
        assert cached("blue") == blue.pixels[0].start  # the text before the picture, not the other picture
        one.close()
        return
    # transformers: reused logits are those of a full prefill (SmolVLM's cache cannot drop a suffix, so this
    # engine recomputes such prompts whole)
    model = vlm.model
    fresh_red = model.prefill(red.prompt, reuse=False, pixels=red.pixels).copy()  # type: ignore[union-attr]
    fresh_blue = model.prefill(blue.prompt, reuse=False, pixels=blue.pixels).copy()  # type: ignore[union-attr]
    assert not np.allclose(fresh_red, fresh_blue)
    model.prefill(red.prompt, reuse=False, pixels=red.pixels)  # type: ignore[union-attr]
    np.testing.assert_allclose(model.prefill(red.prompt, pixels=red.pixels), fresh_red, atol=1e-4)  # type: ignore[union-attr]
    np.testing.assert_allclose(model.prefill(blue.prompt, pixels=blue.pixels), fresh_blue, atol=1e-4)  # type: ignore[union-attr]


def test_a_marker_typed_in_the_text_is_refused(vlm: Engine) -> None:
    with pytest.raises(InvalidRequest, match="must not contain '<image>'"):
        vlm.prepare(ask(Image(picture()), "what is <image>?"))
    with pytest.raises(InvalidRequest, match="must not contain '<image>'"):  # without a picture too
        vlm.prepare(ask("what is <image>?"))
    assert vlm.prepare(ask("what is it?")).prompt == vlm.model.tokenize(vlm.render(ask("what is it?")))


def test_figures_from_code_are_shown_to_a_model_that_sees(vlm: Engine) -> None:
    result = Execution("plotted\n", None, None, (picture((160, 120)),), (), 0.1)
    seen = observation(result, sees=True)
    assert seen.media == (Image(picture((160, 120))),) and "plotted" in seen.content
    prepared = vlm.prepare(Turn((Message("user", "Plot it"), Message("assistant", "```python\nplot()\n```"), seen)))
    assert len(prepared.pixels) == 1
    blind = observation(result, sees=False)
    assert not blind.media and "cannot see them" in blind.content


# The server: a text model (a byte-level fake) beside the tiny vision model.


@pytest.fixture()
def both(make_server, vlm: Engine) -> Server:  # type: ignore[no-untyped-def]
    server: Server = make_server(Engine(ByteModel()), vlm)
    return server


def image_message(data: bytes, text: str = "Extract the receipt.", detail: str = "auto") -> list[dict[str, object]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(data), "detail": detail}},
                                         {"type": "text", "text": text}]}]


def receipt_format() -> dict[str, object]:
    return {"type": "json_schema", "json_schema": {"name": "receipt", "schema": RECEIPT, "strict": True}}


def test_chat_auto_routes_pictures_to_the_vision_model_and_validates(both: Server, vlm: Engine) -> None:
    client = both.client()
    r = client.chat.completions.create(model="auto", messages=image_message(picture()),  # type: ignore[arg-type]
                                       response_format=receipt_format(), max_tokens=60,  # type: ignore[arg-type]
                                       frequency_penalty=0.5)
    assert r.model == vlm.name and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), RECEIPT)
    assert r.usage is not None and r.usage.prompt_tokens > 20  # the picture's tokens are counted
    text = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert text.model == "byte-model"
    assert [m.id for m in client.models.list()] == ["byte-model", vlm.name]


def test_pictures_for_the_text_model_are_a_400_naming_the_vision_model(both: Server, vlm: Engine) -> None:
    with pytest.raises(openai.BadRequestError, match=f"cannot see images; models on this server that can: "
                                                     f"'{re.escape(vlm.name)}'") as err:
        both.client().chat.completions.create(model="byte-model", messages=image_message(picture()))  # type: ignore[arg-type]
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "model"


@pytest.mark.parametrize(
    ("url", "message", "param"),
    [
        ("https://example.com/receipt.png", "does not fetch URLs", "messages[0].content[0].image_url.url"),
        (data_url(b"not a picture"), "known format", "messages[0].content[0]"),
        (data_url(picture()[:80]), "corrupt or truncated", "messages[0].content[0]"),
    ],
)
def test_bad_pictures_are_400s_naming_the_part(both: Server, url: str, message: str, param: str) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(openai.BadRequestError, match=message) as err:
        both.client().chat.completions.create(model="auto", messages=messages)  # type: ignore[arg-type]
    assert isinstance(err.value.body, dict) and err.value.body["param"] == param


def test_responses_input_image_and_a_pdf_file_to_typed_json(both: Server, vlm: Engine) -> None:
    client = both.client()
    uploaded = client.files.create(file=("receipt.pdf", pdf(2)), purpose="user_data")
    text_format = {"format": {"type": "json_schema", "name": "receipt", "schema": RECEIPT, "strict": True}}
    for content in (
        [{"type": "input_image", "image_url": data_url(picture()), "detail": "low"},
         {"type": "input_text", "text": "Extract the receipt."}],
        [{"type": "input_file", "file_id": uploaded.id}, {"type": "input_text", "text": "Extract the receipt."}],
    ):
        r = client.responses.create(model="auto", input=[{"role": "user", "content": content}],  # type: ignore[list-item]
                                    text=text_format, max_output_tokens=60,  # type: ignore[arg-type]
                                    extra_body={"frequency_penalty": 0.5})
        assert r.model == vlm.name and r.status == "completed"
        jsonschema.validate(json.loads(r.output_text), RECEIPT)
    # Two PDF pages at 'auto' detail: each 200 x 280 page (400 x 560 rendered) is 2 x 3 tiles + a global view.
    assert r.usage is not None and r.usage.input_tokens > 2 * 7 * 4


def test_a_follow_up_keeps_the_picture_it_saw(both: Server, vlm: Engine) -> None:
    client = both.client()
    first = client.responses.create(
        model=vlm.name, max_output_tokens=5,
        input=[{"role": "user", "content": [{"type": "input_image", "image_url": data_url(picture())},  # type: ignore[list-item]
                                            {"type": "input_text", "text": "What is it?"}]}])
    second = client.responses.create(model="auto", input="And its colour?", previous_response_id=first.id,
                                     max_output_tokens=5)
    assert second.model == vlm.name  # the conversation holds a picture: auto keeps the model that sees
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens  # the picture is still in the context


def test_cli_ask_with_an_image_prints_typed_json(tiny_smolvlm: Path, tmp_path: Path) -> None:
    (tmp_path / "receipt.png").write_bytes(picture((90, 200), color="white"))
    (tmp_path / "receipt.json").write_text(json.dumps(RECEIPT))
    result = CliRunner().invoke(main, ["ask", "Extract the receipt", "--image", str(tmp_path / "receipt.png"),
                                       "--schema", str(tmp_path / "receipt.json"), "--model", str(tiny_smolvlm),
                                       "--frequency-penalty", "0.5",
                                       "--max-tokens", "80"])
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(result.stdout), RECEIPT)


def test_cli_ask_with_an_image_on_a_text_model_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "receipt.png").write_bytes(picture())
    result = CliRunner().invoke(main, ["ask", "Extract", "--image", str(tmp_path / "receipt.png"),
                                       "--model", "smollm2-135m"])
    assert result.exit_code == 2 and "cannot see images" in result.output
    assert len(result.output.strip().splitlines()) == 1


INVOICES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "invoices"


@pytest.fixture()
def invoices() -> Iterator[Path]:
    if not INVOICES.is_dir():
        pytest.skip("../shared/data/invoices is absent (it is reference data beside the repository, not in it)")
    yield INVOICES


def test_the_real_invoices_go_through_the_whole_pipeline(vlm: Engine, invoices: Path) -> None:
    from smolrun import media

    for png in sorted(invoices.glob("*.png")):
        fields = json.loads((png.with_suffix(".json")).read_text())
        fields = fields[0] if isinstance(fields, list) else fields
        schema = {"type": "object", "properties": {k: {"type": "string", "maxLength": 24} for k in fields},
                  "required": sorted(fields), "additionalProperties": False}
        pages = media.load(png.read_bytes(), png.name)
        text, done = answer(vlm, Turn((Message.of("user", [*pages, "Extract the invoice fields."]),),
                                      ResponseFormat("json_schema", schema, "invoice", strict=True),
                                      SamplingParams(max_tokens=400, temperature=0.7, seed=0,
                                                     frequency_penalty=0.5)))
        assert done.stats.completion_tokens <= 400
        if done.finish_reason != "length":  # a natural end, perhaps on the budget's last token
            assert done.finish_reason == "stop", png.name
        else:
            assert done.stats.completion_tokens == 400, png.name
        if done.finish_reason == "stop":
            jsonschema.validate(json.loads(text), schema)


def test_streaming_a_picture_answer(both: Server, vlm: Engine) -> None:
    chunks = list(both.client().chat.completions.create(
        model="auto", messages=image_message(picture(), detail="low"),  # type: ignore[arg-type]
        response_format=receipt_format(), max_tokens=60, frequency_penalty=0.5, stream=True))  # type: ignore[arg-type]
    assert {c.model for c in chunks} == {vlm.name}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), RECEIPT)


# llama.cpp beside transformers: the same weights must see the same prompt and give the same logits.


@pytest.mark.parametrize(("size", "detail"), [((150, 100), "auto"), ((150, 100), "low"), ((300, 60), "high"),
                                              ((40, 40), "auto"), ((64, 200), "high")])
def test_llama_cpp_and_transformers_agree_on_a_picture(hf_vlm: Engine, gguf_vlm: Engine, size: tuple[int, int],
                                                       detail: str) -> None:
    # One colour: every resize algorithm gives the same pixels, so the two engines' tiles are equal too.
    turn = ask(Image(picture(size, color="orange"), detail), "Describe it.")  # type: ignore[arg-type]
    ours, theirs = gguf_vlm.prepare(turn), hf_vlm.prepare(turn)
    assert ours.prompt == theirs.prompt
    assert [(p.start, p.end) for p in ours.pixels] == [(p.start, p.end) for p in theirs.pixels]
    logits = logits_alone(gguf_vlm, ours)
    expected = hf_vlm.model.prefill(theirs.prompt, reuse=False, pixels=theirs.pixels)  # type: ignore[union-attr]
    np.testing.assert_allclose(logits, expected, atol=2e-3)


def test_llama_cpp_and_transformers_agree_on_a_video(hf_vlm: Engine, gguf_vlm: Engine) -> None:
    clip = Video(tuple(picture((48, 32), color=c) for c in ("red", "green", "blue")), (0.0, 1.0, 2.0), 3.0)
    turn = ask(clip, "What happens?")
    ours, theirs = gguf_vlm.prepare(turn), hf_vlm.prepare(turn)
    assert ours.prompt == theirs.prompt
    np.testing.assert_allclose(logits_alone(gguf_vlm, ours),
                               hf_vlm.model.prefill(theirs.prompt, reuse=False, pixels=theirs.pixels), atol=2e-3)  # type: ignore[union-attr]


def test_the_video_prompt_strings_are_smolvlms_own() -> None:
    from transformers.models.smolvlm import processing_smolvlm

    from smolrun.backends import smolvlm

    assert smolvlm.VIDEO_INTRO == processing_smolvlm.DEFAULT_VIDEO_INTRO
    assert smolvlm.FRAME_STAMP == processing_smolvlm.FRAME_TIMESTAMP_MESSAGE
    assert smolvlm.MEDIA_OUTTRO == processing_smolvlm.DEFAULT_MEDIA_OUTTRO


def test_llama_cpp_drops_a_pictures_tiles_once_its_embeddings_are_cached(gguf_vlm: Engine) -> None:
    prepared = gguf_vlm.prepare(ask(Image(picture(color="purple")), "What?"))
    list(gguf_vlm.generate(replace(prepared, params=SamplingParams(max_tokens=1, temperature=0))))
    held = [p for slot in gguf_vlm._runner._loop.slots for p in slot.pixels]  # type: ignore[union-attr]
    assert [(p.start, p.end, p.values) for p in held if p.digest == prepared.pixels[0].digest] == [
        (p.start, p.end, None) for p in prepared.pixels]


def test_pictures_are_read_on_any_sequence(gguf_vlm: Engine) -> None:
    """Two requests with different pictures at once each get a sequence (logits_alone checks a picture's
    logits on the last sequence against transformers)."""
    import threading

    turns = {c: replace(gguf_vlm.prepare(ask(Image(picture(color=c)), "Colour?")),
                        params=SamplingParams(max_tokens=8, temperature=0)) for c in ("teal", "olive")}
    answers: dict[str, str] = {}
    threads = [threading.Thread(target=lambda c=c: answers.__setitem__(c, answer_prepared(gguf_vlm, turns[c])))
               for c in turns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(answers) == set(turns)
    where = {p.digest: slot.seq for slot in gguf_vlm._runner._loop.slots for p in slot.pixels}  # type: ignore[union-attr]
    seqs = {where[t.pixels[0].digest] for t in turns.values()}
    assert len(seqs) == 2  # two sequences held the two pictures


def answer_prepared(engine: Engine, prepared: Prepared) -> str:
    return "".join(e.text for e in engine.generate(prepared) if isinstance(e, TextDelta))


def logits_alone(engine: Engine, prepared: Prepared) -> npt.NDArray[np.float32]:
    """The logits after a prepared prompt, evaluated from an empty cache on llama.cpp's last sequence (not 0:
    pictures work on any), its text in passes and its tiles through mtmd, as the batch loop does."""
    from smolrun.backends.base import Feed

    model = engine.model
    seq = model.n_seq - 1  # type: ignore[union-attr]
    if engine._runner is not None:  # the batch loop must forget what it cached on that sequence
        slot = engine._runner._loop.slots[seq]  # type: ignore[union-attr]
        assert slot.job is None
        slot.tokens, slot.pixels = [], []
    model.forget(seq, 0)  # type: ignore[union-attr]
    prompt, at = prepared.prompt, 0
    tiles = sorted((start, tile) for p in prepared.pixels for start, tile in p.values.at)
    logits: list[npt.NDArray[np.float32]] = []
    for start, tile in [*tiles, (len(prompt), None)]:
        while at < start:
            end = min(start, at + model.n_batch)  # type: ignore[union-attr]
            logits = model.decode([Feed(seq, at, prompt[at:end], end == len(prompt))])  # type: ignore[union-attr]
            at = end
        if tile is not None:
            model.evaluate_tile(seq, tile, start)  # type: ignore[union-attr]
            at = start + tile[1]
    model.forget(seq, 0)  # type: ignore[union-attr]
    return np.array(logits[0])


def test_a_text_gguf_with_a_projector_that_is_not_smolvlms_is_refused(tiny_smolvlm_gguf: Path) -> None:
    from smolrun.errors import ModelUnavailable

    mmproj = str(tiny_smolvlm_gguf.parent / "mmproj-tiny-smolvlm.gguf")
    with pytest.raises(ModelUnavailable, match="no <image> token"):  # the bundled SmolLM2 has no image tokens
        Engine.load(Settings(threads=2), mmproj=mmproj)
    with pytest.raises(ModelUnavailable, match="could not load the vision projector"):
        Engine.load(Settings(model=str(tiny_smolvlm_gguf), threads=2), mmproj=str(tiny_smolvlm_gguf))


@pytest.mark.parametrize("explicit", [False, True])
def test_cli_ask_with_an_image_on_llama_cpp_prints_typed_json(tiny_smolvlm_gguf: Path, tmp_path: Path,
                                                              explicit: bool) -> None:
    (tmp_path / "receipt.png").write_bytes(picture((90, 200), color="white"))
    (tmp_path / "receipt.json").write_text(json.dumps(RECEIPT))
    model = tiny_smolvlm_gguf
    mmproj: list[str] = []
    if explicit:  # a projector found only through --mmproj, not beside the model
        (tmp_path / "model").mkdir()
        model = tmp_path / "model" / "tiny.gguf"
        shutil.copy(tiny_smolvlm_gguf, model)
        mmproj = ["--mmproj", str(tiny_smolvlm_gguf.parent / "mmproj-tiny-smolvlm.gguf")]
    args = ["ask", "Extract the receipt", "--image", str(tmp_path / "receipt.png"), "--schema",
            str(tmp_path / "receipt.json"), "--model", str(model), "--frequency-penalty", "0.5", "--max-tokens", "80"]
    if explicit:
        blind = CliRunner().invoke(main, args)
        assert blind.exit_code == 2 and "cannot see images" in blind.output
    result = CliRunner().invoke(main, [*args, *mmproj])
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(result.stdout), RECEIPT)


def test_llama_cpp_vision_runs_without_torch(tiny_smolvlm_gguf: Path, tmp_path: Path) -> None:
    (tmp_path / "receipt.png").write_bytes(picture((90, 200), color="white"))
    script = f"""
import sys
sys.modules["torch"] = sys.modules["transformers"] = None  # any import of either fails
from smolrun.config import Settings
from smolrun.engine import Engine
from smolrun import media
from smolrun.turn import Done, Message, SamplingParams, Turn
engine = Engine.load(Settings(model={str(tiny_smolvlm_gguf)!r}, threads=2, n_ctx=4096))
pictures = media.load(open({str(tmp_path / "receipt.png")!r}, "rb").read(), "receipt.png")
turn = Turn((Message.of("user", [*pictures, "Describe it."]),), params=SamplingParams(max_tokens=5, seed=0))
prepared = engine.prepare(turn)
events = list(engine.generate(prepared))
done = events[-1]
print(len(prepared.pixels), isinstance(done, Done) and done.stats.prompt_tokens == len(prepared.prompt) > 20)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "True"]
