"""Vision benchmark: picture preprocessing time and image tokens per picture for typical document sizes under
SmolVLM2's processor settings, the memory each SmolVLM2 size needs (from its architecture), and the CPU time of
one tile through each vision encoder, on transformers (float32) and on llama.cpp (the same random weights turned
into an mmproj GGUF by llama.cpp's converter, f16 and Q8_0 as published): random weights, the same arithmetic.

    python bench/vision.py [--threads 2] [--out BENCHMARKS.md]

No SmolVLM2 weights can be downloaded here, so nothing below runs a trained model. The architectures are
SmolVLM2's published configurations; the parameter counts they give (2.25B, 507M, 256M) match the model names.
The real invoices of ../shared/data/invoices are measured too when that folder is there.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image as PILImage
from report import write_section
from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from smolrun import media
from smolrun.backends.llama_cpp import LlamaCppModel
from smolrun.backends.mtmd import MtmdVision
from smolrun.models import resolve

ROOT = Path(__file__).resolve().parent.parent
INVOICES = ROOT.parent / "shared" / "data" / "invoices"
CONTEXT = 8192  # smolrun's default n_ctx
CONVERTER = Path(sys.prefix) / "share" / "llama.cpp" / "convert_hf_to_gguf.py"  # unpacked by `make setup`


@dataclass(frozen=True)
class Size:
    name: str
    text: dict[str, int]
    vision: dict[str, int]
    scale_factor: int
    longest_edge: int  # the processor's size.longest_edge: pictures are resized to it first
    tile: int  # max_image_size.longest_edge: the side of one tile

    @property
    def tokens_per_tile(self) -> int:
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2 // self.scale_factor**2

    def config(self) -> SmolVLMConfig:
        return SmolVLMConfig(text_config={"model_type": "llama", "vocab_size": 49280, **self.text},
                             vision_config=self.vision, scale_factor=self.scale_factor)


SIGLIP_B16_512 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "patch_size": 16, "image_size": 512}
SIZES = (
    Size("SmolVLM2-2.2B", {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                           "num_attention_heads": 32, "num_key_value_heads": 32},
         {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
          "patch_size": 14, "image_size": 384}, 3, 1536, 384),
    Size("SmolVLM2-500M", {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                           "num_attention_heads": 15, "num_key_value_heads": 5}, SIGLIP_B16_512, 4, 2048, 512),
    Size("SmolVLM2-256M", {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                           "num_attention_heads": 9, "num_key_value_heads": 3}, SIGLIP_B16_512, 4, 2048, 512),
)

DOCUMENTS = [  # (what, width, height)
    ("receipt photo", 600, 1600),
    ("A4 page, PDF at 144 dpi", 1190, 1684),
    ("A4 scan at 300 dpi", 2480, 3508),
    ("screenshot 1920x1080", 1920, 1080),
    ("phone photo 12 MP", 4032, 3024),
    ("chart 640x480", 640, 480),
]


def document(width: int, height: int) -> bytes:
    """A page-like picture: white with dark text-like bars (JPEG-encoded, as photos and scans arrive)."""
    picture = PILImage.new("RGB", (width, height), "white")
    pixels = picture.load()
    assert pixels is not None
    for y in range(height // 20, height, max(1, height // 40)):
        for x in range(width // 10, width * 9 // 10, 3):
            pixels[x, y] = (20, 20, 20)
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=90)
    return out.getvalue()


def preprocess(processor: SmolVLMImageProcessorPil, data: bytes, split: bool) -> int:
    """Decode (as smolrun does), then the processor: returns the number of tiles."""
    (item,) = media.load(data, "bench")
    assert isinstance(item, media.Image)
    with PILImage.open(io.BytesIO(item.data)) as picture:
        rgb = picture.convert("RGB")
    out = processor([[rgb]], do_image_splitting=split, return_tensors="pt")
    return int(out["pixel_values"].shape[1])


def median_ms(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def memory_rows() -> list[str]:
    rows = []
    for size in SIZES:
        config = size.config()
        with torch.device("meta"):
            model = SmolVLMForConditionalGeneration(config)
        params = sum(p.numel() for p in model.parameters())
        vision = sum(p.numel() for p in model.model.vision_model.parameters())
        text = config.text_config
        head_dim = text.hidden_size // text.num_attention_heads
        kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim  # keys and values
        rows.append(f"| {size.name} | {params / 1e9:.2f} B ({vision / 1e6:.0f} M vision) | "
                    f"{params * 4 / 2**30:.1f} GiB | {params * 2 / 2**30:.1f} GiB | "
                    f"{kv_per_token * CONTEXT * 4 / 2**30:.2f} GiB | {kv_per_token * CONTEXT * 2 / 2**30:.2f} GiB | "
                    f"{(params * 4 + kv_per_token * CONTEXT * 4) / 2**30:.1f} GiB | "
                    f"{(params * 2 + kv_per_token * CONTEXT * 2) / 2**30:.1f} GiB |")
    return rows


def encoder_seconds_per_tile(size: Size) -> float:
    """One tile through the vision encoder and connector, float32 on the CPU (random weights)."""
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration(size.config()).model
    model.text_model = None  # only the picture side is timed; frees the language model's memory
    tile = torch.randn(1, 1, 3, size.tile, size.tile)
    with torch.inference_mode():
        model.get_image_features(tile)  # warm-up
        return median_ms(lambda: model.get_image_features(tile), 3) / 1000


def llama_cpp_seconds_per_tile(size: Size, threads: int) -> dict[str, float]:
    """One tile through llama.cpp's encoder (libmtmd), per projector type: the model's vision side with random
    weights, a one-layer language model (the projector must match its width), converted by llama.cpp itself."""
    from transformers import AutoTokenizer

    gguf = resolve("smollm2-135m").path
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tiles = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tokenizer.add_tokens(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *tiles])
    text = {**size.text, "num_hidden_layers": 1}
    config = SmolVLMConfig(text_config={"model_type": "llama", "architectures": ["VLlama3ForCausalLM"],
                                        "vocab_size": len(tokenizer), **text},
                           vision_config=size.vision, scale_factor=size.scale_factor,
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        SmolVLMForConditionalGeneration(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        SmolVLMImageProcessorPil(size={"longest_edge": size.longest_edge},
                                 max_image_size={"longest_edge": size.tile}).save_pretrained(folder)
        convert = [sys.executable, str(CONVERTER), str(folder)]
        subprocess.run([*convert, "--outtype", "f16", "--outfile", f"{tmp}/text.gguf"], check=True,
                       capture_output=True)
        for kind in ("f32", "f16", "q8_0"):
            mmproj = Path(tmp) / f"mmproj-{kind}.gguf"
            subprocess.run([*convert, "--mmproj", "--outtype", kind, "--outfile", str(mmproj)], check=True,
                           capture_output=True)
            model = LlamaCppModel(Path(tmp) / "text.gguf", name="bench", n_ctx=2048, n_threads=threads,
                                  mmproj=mmproj)
            assert isinstance(model.vision, MtmdVision)
            seconds[kind] = mtmd_encode_seconds(model.vision, document(size.tile, size.tile))
    return seconds


def mtmd_encode_seconds(vision: MtmdVision, picture: bytes) -> float:
    import llama_cpp.mtmd_cpp as mtmd

    _, segments = vision._cut(picture)  # every tile (and the overview) has the encoder's input size
    chunk = next(s for s in segments if isinstance(s, tuple))[0]

    def encode() -> None:
        if mtmd.mtmd_encode_chunk(vision._ctx, chunk) != 0:
            raise RuntimeError("mtmd_encode_chunk failed")

    encode()  # warm-up
    return median_ms(encode, 3) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    inputs = [(what, document(w, h), f"{w}x{h}") for what, w, h in DOCUMENTS]
    if INVOICES.is_dir():
        for png in sorted(INVOICES.glob("*.png")):
            with PILImage.open(png) as picture:
                inputs.append((f"invoice {png.stem}", png.read_bytes(), f"{picture.width}x{picture.height}"))
    else:
        print("../shared/data/invoices is absent: only synthetic documents are measured")

    lines = ["| picture | pixels | model | tiles (auto) | image tokens (auto) | preprocess ms (auto) | "
             "image tokens (low) | preprocess ms (low) |", "|---|---|---|---|---|---|---|---|"]
    for size in SIZES[:2]:  # 256M cuts pictures as 500M does
        processor = SmolVLMImageProcessorPil(size={"longest_edge": size.longest_edge},
                                             max_image_size={"longest_edge": size.tile})
        for what, data, pixels in inputs:
            tiles = preprocess(processor, data, split=True)
            high = median_ms(lambda d=data, p=processor: preprocess(p, d, True), 5)  # type: ignore[misc]
            low = median_ms(lambda d=data, p=processor: preprocess(p, d, False), 5)  # type: ignore[misc]
            lines.append(f"| {what} | {pixels} | {size.name} | {tiles} | {tiles * size.tokens_per_tile} | "
                         f"{high:.0f} | {size.tokens_per_tile} | {low:.0f} |")
    pdf_page = io.BytesIO()
    PILImage.new("RGB", (595, 842), "white").save(pdf_page, format="PDF")
    render_ms = median_ms(lambda: media.load(pdf_page.getvalue(), "bench"), 5)

    memory = ["| model | parameters | weights fp32 (CPU) | weights bf16 (GPU) | KV cache at 8192 tokens, fp32 | "
              "same, bf16 | total CPU fp32 | total GPU bf16 |", "|---|---|---|---|---|---|---|---|", *memory_rows()]
    per_tile = encoder_seconds_per_tile(SIZES[0])
    per_tile_small = encoder_seconds_per_tile(SIZES[1])
    encoders = ["| model | transformers, float32 | llama.cpp, f32 mmproj | llama.cpp, f16 mmproj | "
                "llama.cpp, Q8_0 mmproj |", "|---|---|---|---|---|"]
    if CONVERTER.is_file():
        for size, torch_s in ((SIZES[0], per_tile), (SIZES[1], per_tile_small)):
            cpp = llama_cpp_seconds_per_tile(size, args.threads)
            cells = " | ".join(f"{cpp[k]:.2f} s ({cpp[k] / torch_s:.1f}x)" for k in ("f32", "f16", "q8_0"))
            encoders.append(f"| {size.name}{'' if size is SIZES[0] else ' (and 256M)'} | {torch_s:.2f} s | {cells} |")
    else:
        print(f"llama.cpp's converter is not at {CONVERTER} (run `make setup`): no llama.cpp encoder rows")

    body = "\n".join([
        "## Vision (SmolVLM2 picture side)",
        "",
        f"`python bench/vision.py --threads {args.threads}`: {args.threads} CPU threads. No SmolVLM2 weights can be "
        "downloaded here: tiles and tokens follow each model's processor settings (2.2B: pictures resized to "
        "1536 on the longest side, 384-pixel tiles, 81 tokens a tile; 500M and 256M: 2048, 512, 64), memory "
        "comes from the architectures (their parameter counts match the model names), and the encoder time "
        "uses random weights of the same shape.",
        "",
        "### Tiles and image tokens per picture",
        "",
        "`auto` (= `high`): tiles plus a global view; `low`: the global view alone. Preprocessing = decode, "
        "resize, split, normalise (Pillow, no torchvision). Documents are synthetic pages of each size unless "
        "named as invoices (`../shared/data/invoices`).",
        "",
        *lines,
        "",
        f"Rendering one A4 PDF page to a picture (pypdfium2, 144 dpi): {render_ms:.0f} ms.",
        "",
        "### Memory by model size",
        "",
        "Weights plus the KV cache of a full 8192-token context (activations and the vision encoder's working "
        "memory come on top, a few hundred MB). float32 is smolrun's CPU default, bfloat16 its GPU default.",
        "",
        *memory,
        "",
        "### Vision encoder on the CPU",
        "",
        f"One tile through the encoder and connector, {args.threads} threads, in one run: on transformers "
        "(float32, smolrun's CPU default) and on llama.cpp (libmtmd, the same weights converted by llama.cpp's "
        "`convert_hf_to_gguf.py --mmproj`; the published SmolVLM2 GGUFs ship a Q8_0 projector). In parentheses: "
        "llama.cpp's time as a multiple of transformers'.",
        "",
        *encoders,
        "",
        f"On transformers a document at `auto` detail (9-17 tiles on 2.2B) costs {9 * per_tile:.0f}-"
        f"{17 * per_tile:.0f} s of encoding before the first token on this CPU, against {per_tile:.1f} s at "
        "`low`. llama.cpp's gain is memory and no torch (the 2.2B model is 1.7 GB as Q4_K_M + a Q8_0 projector "
        "against 8.4 GiB in float32), and quantized text decoding; where the encoder time matters more, the "
        "500M/256M models or `detail: low` cut it most.",
    ])
    print(body)
    write_section(args.out, "vision", body)


if __name__ == "__main__":
    main()
