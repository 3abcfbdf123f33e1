"""Build (once) a GGUF shaped exactly like SmolLM3-3B, with random weights, quantised to Q4_K_M.

    python bench/make_3b.py [--check] [--threads 2]

Prints the path of the cached file, ~/.cache/smolrun/bench/smollm3-3b-shaped-q4_k_m.gguf, and does nothing
else when it exists already. For benchmarking decode speed of a 3B model on CPU: a forward pass costs the
same whatever the weights hold, and SmolLM3's weights cannot be downloaded here. `--check` loads the file and
times one decoding pass for 1 and for 8 sequences (as bench/concurrency.py's pass_ceiling does).

The model: transformers' SmolLM3ForCausalLM, randomly initialised in bfloat16 (~6 GB in memory), with
SmolLM3-3B's shapes (36 layers, hidden 2048, FFN 11008, 16 heads, 4 KV heads, vocabulary 128,256, tied
embeddings, no RoPE in every 4th layer, RoPE base 5e6, 64k context: ../shared/reference/smol-models.md and
transformers' SmolLM3Config defaults), converted to bf16 GGUF by llama.cpp's own converter (unpacked by `make
setup` from the llama-cpp-python sdist, so it matches the installed libllama) and quantised by libllama.

The tokenizer is SmolLM2's (from the bundled GGUF), with its ChatML template, its vocabulary filled up to
128,256 tokens with synthetic ones (concatenations of two real tokens, without merges: a prompt never
tokenizes to them, but the model samples them and they detokenize to text, so the output layer, sampling and
grammar masks work over a vocabulary of SmolLM3's size). Needs ~13 GB of free disk while it builds.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CACHE = Path.home() / ".cache" / "smolrun" / "bench"
TARGET = CACHE / "smollm3-3b-shaped-q4_k_m.gguf"
CONVERTER = Path(sys.prefix) / "share" / "llama.cpp" / "convert_hf_to_gguf.py"  # unpacked by `make setup`

# HuggingFaceTB/SmolLM3-3B. transformers' defaults match except the RoPE base and the context, which the
# checkpoint overrides (defaults: 2e6 and 32768). NoPE layers come from no_rope_layer_interval=4 (the default):
# llama.cpp hard-codes the same step, and the GGUF carries no per-layer flag.
SMOLLM3_3B: dict[str, Any] = {
    "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
    "num_attention_heads": 16, "num_key_value_heads": 4, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "no_rope_layer_interval": 4, "max_position_embeddings": 65536,
    "rope_parameters": {"rope_theta": 5_000_000.0, "rope_type": "default"},
}


def step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def save_tokenizer(folder: Path, vocab_size: int) -> dict[str, int]:
    """SmolLM2's tokenizer saved to `folder`, its vocabulary filled up to `vocab_size`; returns its special ids."""
    from transformers import AutoTokenizer

    from smolrun.models import resolve

    gguf = resolve("smollm2-135m", offline=True).path
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(folder)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.eos_token_id}
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    special = {t["content"] for t in spec["added_tokens"]}
    pieces = [t for t in vocab if t not in special]
    rng = random.Random(0)
    # No merges for the new tokens: BPE never produces them, so the tokenization of llama.cpp's check text is
    # unchanged and the converter still recognises SmolLM2's pre-tokenizer by its hash.
    while len(vocab) < vocab_size:
        vocab.setdefault(rng.choice(pieces) + rng.choice(pieces), len(vocab))
    path.write_text(json.dumps(spec, ensure_ascii=False))
    return ids


def save_model(folder: Path, config: dict[str, Any], special_ids: dict[str, int]) -> None:
    import torch
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: ~6 GB instead of ~12 in f32
    try:
        model = SmolLM3ForCausalLM(SmolLM3Config(**{**config, **special_ids}))
    finally:
        torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    step(f"  {params / 1e9:.3f}B parameters; saving")
    model.save_pretrained(folder)


def convert(folder: Path, out: Path) -> None:
    if not CONVERTER.is_file():
        sys.exit(f"llama.cpp's converter is not at {CONVERTER}: run `make setup`")
    command = [sys.executable, str(CONVERTER), str(folder), "--outtype", "bf16", "--outfile", str(out),
               "--model-name", "SmolLM3-3B-shaped (random weights)"]  # general.name; else the folder's name
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"convert_hf_to_gguf.py failed ({done.returncode}):\n{done.stderr[-4000:]}")


def quantize(source: Path, out: Path, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        sys.exit(f"llama_model_quantize failed on {source}")


def build(out: Path, config: dict[str, Any], threads: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # The temporary files (~6 GB of safetensors, ~6 GB of bf16 GGUF) beside the target: the final rename is atomic.
    with tempfile.TemporaryDirectory(prefix="make-3b-", dir=out.parent) as tmp:
        hf, bf16, partial = Path(tmp) / "hf", Path(tmp) / "bf16.gguf", Path(tmp) / "q4_k_m.gguf"
        step("1/4 tokenizer: SmolLM2's, filled up to the vocabulary size")
        special_ids = save_tokenizer(hf, config["vocab_size"])
        step("2/4 model: random SmolLM3ForCausalLM in bfloat16")
        save_model(hf, config, special_ids)
        step("3/4 convert to a bf16 GGUF (llama.cpp's convert_hf_to_gguf.py)")
        convert(hf, bf16)
        shutil.rmtree(hf)  # frees ~6 GB before quantising
        step(f"  {bf16.stat().st_size / 2**30:.2f} GiB")
        step("4/4 quantise to Q4_K_M (libllama)")
        quantize(bf16, partial, threads)
        partial.rename(out)


def check(path: Path, threads: int, parallel: int = 8) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from concurrency import pass_ceiling  # the measurement bench/concurrency.py reports

    one, many, prompt = pass_ceiling(path, threads, parallel)
    print(f"one decoding pass: {one:.1f} ms for 1 sequence ({1000 / one:.1f} tok/s), {many:.1f} ms for {parallel} "
          f"({parallel * 1000 / many:.1f} tok/s, {parallel * one / many:.2f}x); prompt {prompt:.1f} ms a token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--check", action="store_true", help="then time decoding passes of 1 and 8 sequences")
    args = parser.parse_args()
    started = time.perf_counter()
    if TARGET.is_file():
        step(f"cached: {TARGET}")
    else:
        build(TARGET, SMOLLM3_3B, args.threads)
        step(f"built in {time.perf_counter() - started:.0f} s")
    step(f"{TARGET} ({TARGET.stat().st_size / 2**30:.2f} GiB, {TARGET.stat().st_size:,} bytes)")
    if args.check:
        check(TARGET, args.threads)


if __name__ == "__main__":
    main()
