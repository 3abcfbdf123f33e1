"""Compile a response format into an llguidance grammar for one tokenizer, cached by schema hash."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from threading import Lock
from typing import Any

from llguidance import LLMatcher, LLParserLimits, LLTokenizer

from smolrun.errors import SchemaError
from smolrun.turn import ResponseFormat

# Compact JSON: no whitespace between tokens. Flexible whitespace lets a small model emit blanks until
# max_tokens (llama-cpp-python #1500); compact output is also fewer tokens and more of them forced.
JSON_OPTIONS: Any = {"whitespace_flexible": False}  # llguidance's JsonCompileOptions TypedDict (stub-only)


@dataclass(frozen=True)
class Grammar:
    """A validated grammar compiled for one tokenizer; each generation takes its own matcher."""

    key: str
    source: str
    template: LLMatcher  # pristine matcher: copying it skips re-compiling the grammar

    def matcher(self) -> LLMatcher:
        return self.template.deep_copy()


def grammar_source(fmt: ResponseFormat) -> str | None:
    """The llguidance grammar for a response format (None for free text)."""
    if fmt.type == "text":
        return None
    schema: dict[str, Any] = {"type": "object"} if fmt.type == "json_object" else (fmt.schema or {})
    return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


# A code call in the model's own format: one fenced python block, closed by the fence (one lexeme, because
# llguidance's lexer does not backtrack out of the code when it meets the closing backticks).
CODE_FENCE = "```python\n"
_CODE = r"/```python\n([^`]|`[^`]|``[^`])*```/"


def turn_source(fmt: ResponseFormat) -> str:
    """Lark grammar: either one code block or the final answer (free text not starting with a backtick,
    or JSON under the response format)."""
    if fmt.type == "text":
        answer = "TEXT\nTEXT: /[^`](.|\\n)*/"
    else:
        schema = {"type": "object"} if fmt.type == "json_object" else (fmt.schema or {})
        answer = "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})
    return LLMatcher.grammar_from_lark(f"start: CODE | answer\nCODE: {_CODE}\nanswer: {answer}\n")


class GrammarCache:
    """Grammars compiled for one tokenizer, least recently used evicted first."""

    def __init__(self, tokenizer: LLTokenizer, maxsize: int = 256) -> None:
        self.tokenizer = tokenizer
        self.maxsize = maxsize
        self._items: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = Lock()
        self._limits = LLParserLimits(verbose_errors=False)  # errors must not echo schemas into logs

    def get(self, fmt: ResponseFormat, allow_code: bool = False) -> Grammar | None:
        """The grammar for one model turn: the answer format, or (allow_code) a code block or that answer."""
        source = turn_source(fmt) if allow_code else grammar_source(fmt)
        if source is None:
            return None
        key = hashlib.sha256(source.encode()).hexdigest()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        grammar = self._compile(key, source, fmt)
        with self._lock:
            self._items[key] = grammar
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return grammar

    def _compile(self, key: str, source: str, fmt: ResponseFormat) -> Grammar:
        is_error, messages = LLMatcher.validate_grammar_with_warnings(source, self.tokenizer, limits=self._limits)
        if is_error or messages:
            raise SchemaError(f"Invalid schema for response_format {fmt.name!r}: {'; '.join(messages)}")
        matcher = LLMatcher(self.tokenizer, source, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise SchemaError(f"Invalid schema for response_format {fmt.name!r}: {matcher.get_error()}")
        return Grammar(key, source, matcher)


def compile_format(fmt: ResponseFormat, tokenizer: LLTokenizer) -> Grammar | None:
    """Compile without a cache (tests, one-off use)."""
    return GrammarCache(tokenizer, maxsize=1).get(fmt)

