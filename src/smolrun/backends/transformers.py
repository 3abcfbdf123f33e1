"""Hugging Face models through transformers (extra `smolrun[transformers]`): the same decode loop over the
model's forward pass, on CUDA when present, with the KV cache kept between requests for prefix reuse.
Vision-language models (SmolVLM) load with their image processor and see pictures at their image tokens."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from smolrun.backends.base import Pixels, Vision, reusable_prefix, reusable_with_pixels
from smolrun.backends.tokenizer import HFTokenizer
from smolrun.errors import BackendMissing, ModelUnavailable, first_line


def _import_torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise BackendMissing(
            "the transformers engine needs torch and transformers: pip install 'smolrun[transformers]'"
        ) from exc
    return torch, transformers


@dataclass(frozen=True)
class HFSource:
    """Where transformers loads a model from: a Hub id or a directory, and a GGUF file inside it, if any."""

    name: str  # what /v1/models reports
    location: str
    gguf_file: str | None = None


class TransformersModel:
    """One causal LM with one KV-cache sequence; not thread-safe (the scheduler serialises use)."""

    def __init__(self, source: HFSource, *, n_ctx: int = 8192, device: str | None = None,
                 threads: int | None = None, offline: bool = False) -> None:
        torch, transformers = _import_torch()
        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # bf16 on GPUs; float32 on CPUs, where bf16 matmuls are slow on most machines.
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        extra: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        self.vision: Vision | None = None
        try:
            config = transformers.AutoConfig.from_pretrained(source.location, local_files_only=offline, **extra)
            sees = getattr(config, "vision_config", None) is not None
            auto = transformers.AutoModelForImageTextToText if sees else transformers.AutoModelForCausalLM
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                source.location, local_files_only=offline, **extra)
            self.hf = auto.from_pretrained(
                source.location, dtype=dtype, local_files_only=offline, **extra).to(self.device).eval()
            template = self.tokenizer.chat_template
            if sees:
                from smolrun.backends.vision import SmolVLMVision

                processor = transformers.AutoImageProcessor.from_pretrained(source.location, local_files_only=offline)
                self.vision = SmolVLMVision(processor, config, self.tokenizer)
                template = _processor_template(source.location, offline) or template
        except OSError as exc:  # missing files, or the Hub unreachable: transformers raises OSError for both
            reason = first_line(exc)
            raise ModelUnavailable(
                f"could not load {source.location!r} with transformers ({reason.rstrip('.')}); where the Hub "
                f"is reachable, download it first: hf download {source.location}") from exc
        self.name = source.name
        self.dtype = dtype
        config = self.hf.config.get_text_config()
        n_vocab = int(self.hf.get_output_embeddings().weight.shape[0])
        self.n_ctx = min(n_ctx, int(getattr(config, "max_position_embeddings", n_ctx) or n_ctx))
        self.text = HFTokenizer(self.tokenizer, n_vocab, [getattr(self.hf.generation_config, "eos_token_id", None)],
                                template if isinstance(template, str) else None)
        self.n_vocab = n_vocab
        self.eog_tokens = self.text.eog_tokens
        self.lltokenizer = self.text.lltokenizer
        self.chat_template = self.text.chat_template
        self.bos_token, self.eos_token = self.text.bos_token, self.text.eos_token
        self._cache: Any = None
        self._tokens: list[int] = []
        self.reused = 0
        self._pixels: list[Pixels] = []  # the pictures whose image tokens the cache holds

    def tokenize(self, text: str) -> list[int]:
        return self.text.tokenize(text)

    def token_bytes(self, token: int) -> bytes:
        return self.text.token_bytes(token)

    def prefill(self, tokens: Sequence[int], reuse: bool = True,
                pixels: Sequence[Pixels] = ()) -> npt.NDArray[np.float32]:
        if pixels and self.vision is None:
            raise ValueError(f"{self.name} cannot see: it got pictures")
        common = reusable_prefix(self._tokens, tokens) if reuse and self._cache is not None else 0
        common = reusable_with_pixels(common, self._pixels, pixels)
        if common > 0:
            try:
                self._cache.crop(common)
            except (AttributeError, ValueError, NotImplementedError):  # caches that cannot drop a suffix
                common = 0
        if common == 0:
            from transformers import DynamicCache

            self._cache = DynamicCache(config=self.hf.config)
        self._tokens = self._tokens[:common]
        self.reused = common
        new = [p for p in pixels if p.start >= common]
        self._pixels = [p for p in self._pixels if p.end <= common] + new
        return self.extend(tokens[common:], new)

    def extend(self, tokens: Sequence[int], pixels: Sequence[Pixels] = ()) -> npt.NDArray[np.float32]:
        torch = self._torch
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        images: dict[str, Any] = {}
        if pixels:  # every picture's tiles in prompt order: the model fills the image tokens in that order
            tiles = torch.cat([p.values for p in pixels]).unsqueeze(0)
            images["pixel_values"] = tiles.to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            out = self.hf(input_ids=ids, cache=self._cache, use_cache=True, logits_to_keep=1, **images)
        self._cache = out.cache
        self._tokens += list(tokens)
        logits: npt.NDArray[np.float32] = out.logits[0, -1].float().cpu().numpy()
        return logits


def _processor_template(location: str, offline: bool) -> str | None:
    """The chat template a vision model's processor carries (SmolVLM keeps it beside the processor config,
    and its tokenizer may have none)."""
    from transformers.utils.hub import cached_file

    for filename in ("chat_template.jinja", "chat_template.json", "processor_config.json"):
        path = cached_file(location, filename, local_files_only=offline, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        if path is None:
            continue
        text = Path(path).read_text(encoding="utf-8")
        if filename.endswith(".jinja"):
            return text
        template = json.loads(text).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def hf_source(name: str, *, offline: bool | None = None) -> HFSource:
    """Where transformers should load `name` from: a registry model's Hugging Face repo (or its GGUF when
    it has none), a local directory, a local .gguf file, `owner/repo:file.gguf`, or a Hub id."""
    from smolrun.models import REGISTRY, resolve

    spec = REGISTRY.get(name)
    if spec is not None and spec.hf_model:
        return HFSource(name, spec.hf_model)
    path = Path(name).expanduser()
    if spec is None and path.is_dir():
        return HFSource(path.name, str(path.resolve()))
    if spec is not None or name.endswith(".gguf"):
        resolved = resolve(name, offline=offline)
        return HFSource(resolved.name, str(resolved.path.parent), resolved.path.name)
    return HFSource(name, name)
