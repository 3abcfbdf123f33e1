"""A Hugging Face model's tokenizer side without its weights: render, tokenize, constrain and replay a turn.

The transformers engine wraps it around its weights; the vLLM engine uses it alone, so that every prompt is
tokenized and every grammar compiled here, with the same tokenizer as the remote server's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from llguidance import LLTokenizer

# End-of-turn tokens of common chat formats: generation stops on any of them that the vocabulary has.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<end_of_utterance>")


class HFTokenizer:
    """A transformers tokenizer with what the decode loops need from it: end tokens, llguidance's view of the
    vocabulary, and each token's bytes."""

    def __init__(self, tokenizer: Any, n_vocab: int, eos_ids: Iterable[int | list[int] | None],
                 chat_template: str | None) -> None:
        self.tokenizer = tokenizer
        self.n_vocab = n_vocab
        self.eog_tokens = frozenset(self._end_tokens(eos_ids))
        self.lltokenizer = self._lltokenizer()
        special = self.eog_tokens | {t for t in (tokenizer.bos_token_id, tokenizer.pad_token_id) if t is not None}
        self._pieces = [b"" if t in special else self.lltokenizer.decode_bytes([t]) for t in range(n_vocab)]
        self.chat_template = chat_template
        self.bos_token: str = tokenizer.bos_token or ""
        self.eos_token: str = tokenizer.eos_token or ""

    def _end_tokens(self, eos_ids: Iterable[int | list[int] | None]) -> set[int]:
        ids: set[int] = set()
        for value in (self.tokenizer.eos_token_id, *eos_ids):
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_TOKENS if t in vocab)
        return {t for t in ids if 0 <= t < self.n_vocab}

    def _lltokenizer(self) -> LLTokenizer:
        """llguidance's view of the tokenizer. Added tokens written as tags (`<think>`, `<tool_call>`) count
        as special, as llguidance does for llama.cpp's user-defined tokens: the grammar then names them as
        tokens, and a free-text lexeme cannot run over them."""
        data = json.loads(self.tokenizer.backend_tokenizer.to_str())
        for added in data.get("added_tokens", []):
            content = added.get("content", "")
            if content.startswith("<") and content.endswith(">"):
                added["special"] = True
        return LLTokenizer(json.dumps(data), n_vocab=self.n_vocab, eos_token=sorted(self.eog_tokens))

    def tokenize(self, text: str) -> list[int]:
        # Chat templates write the BOS themselves (transformers' apply_chat_template adds no special tokens).
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def token_bytes(self, token: int) -> bytes:
        return self._pieces[token] if 0 <= token < self.n_vocab else b""
