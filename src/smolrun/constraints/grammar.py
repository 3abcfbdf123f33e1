"""Compile a response format into an llguidance grammar for one tokenizer, cached by schema hash."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from threading import Lock
from typing import Any

from llguidance import LLMatcher, LLParserLimits, LLTokenizer

from smolrun.constraints.rewrite import ignored_formats
from smolrun.errors import SchemaError
from smolrun.prompt.profiles import FENCE, CodeFormat
from smolrun.prompt.tools import CLOSE as TOOL_CLOSE
from smolrun.prompt.tools import OPEN as TOOL_OPEN
from smolrun.thinking import ThinkBlock
from smolrun.turn import NO_TOOLS, ResponseFormat, ToolUse

# Compact JSON: no whitespace between tokens. Flexible whitespace lets a small model emit blanks until
# max_tokens (llama-cpp-python #1500); compact output is also fewer tokens and more of them forced.
JSON_OPTIONS: Any = {"whitespace_flexible": False}  # llguidance's JsonCompileOptions TypedDict (stub-only)


@dataclass(frozen=True)
class Grammar:
    """A validated grammar compiled for one tokenizer; each generation takes its own matcher."""

    key: str
    source: str
    template: LLMatcher  # pristine matcher: copying it skips re-compiling the grammar
    ignored_formats: tuple[str, ...] = ()  # formats in the schemas accepted without being enforced

    def matcher(self) -> LLMatcher:
        return self.template.deep_copy()


def grammar_source(fmt: ResponseFormat) -> str | None:
    """The llguidance grammar for a response format (None for free text), in Lark like every turn grammar, so
    that the vLLM engine sends each one as it is."""
    if fmt.type == "text":
        return None
    return "start: %json " + json.dumps({**_schema(fmt), "x-guidance": JSON_OPTIONS}) + "\n"


def _schema(fmt: ResponseFormat) -> dict[str, Any]:
    return {"type": "object"} if fmt.type == "json_object" else bounded_integers(fmt.schema or {})


# Integers without bounds of their own stay within what a double holds exactly: most JSON parsers keep no more,
# and a tiny model left greedy may otherwise write digits until max_tokens. A schema's own bounds win.
MAX_SAFE_INTEGER = 2**53 - 1
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_VALUES = ("const", "enum", "default", "examples")


def bounded_integers(node: Any) -> Any:
    """`node` with every integer schema in it that has no bound of its own bounded to +-MAX_SAFE_INTEGER."""
    if isinstance(node, list):
        return [bounded_integers(v) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: bounded_integers(sub) for name, sub in value.items()}
        else:
            out[key] = value if key in _VALUES else bounded_integers(value)
    kind = out.get("type")
    if kind == "integer" or (isinstance(kind, list) and "integer" in kind and "number" not in kind):
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -MAX_SAFE_INTEGER
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = MAX_SAFE_INTEGER
    return out


# A fenced python block is one lexeme closed by the fence, because llguidance's lexer does not backtrack out
# of the code when it meets the closing backticks.
_FENCED_CODE = r"/```python\n([^`]|`[^`]|``[^`])*```/"


def _code_rules(code: CodeFormat, term: Callable[[str], str]) -> list[str]:
    if code == FENCE:
        return [f"code: {_FENCED_CODE}"]
    open_, close = term(code.open), term(code.close)
    if open_.startswith("<[") and close.startswith("<["):  # special tokens: free text between them
        return [f"code: {open_} CODE_BODY {close}", "CODE_BODY: /(.|\\n)*/"]
    # Tags spelled in text: one lazy lexeme, which ends at the first closing tag.
    return [f"code[lazy]: /{_escape(code.open)}(.|\\n)*{_escape(code.close)}/"]


def _escape(text: str) -> str:
    """Literal text in a Lark regex (Rust syntax, where an escaped < or > would be a word boundary)."""
    return "".join("\\" + c if c in "\\.^$|?*+()[]{}/-" else c for c in text)


def turn_source(fmt: ResponseFormat, allow_code: bool = False, tools: ToolUse = NO_TOOLS,
                think: ThinkBlock | None = None, term: Callable[[str], str] = json.dumps,
                code: CodeFormat = FENCE, must_code: bool = False) -> str | None:
    """The grammar of one model turn: a think block when the model thinks, then a code block, function
    calls, or the answer, as allowed.

    Without thinking, code or tools this is the answer format alone (None for free text). Free text may not
    start with the first character of another branch, so the choice is made by the first token. `term`
    writes a tag in the grammar: quoted text, or a token where the tag is one special token. `code` is the
    model's format for code calls.
    """
    active = tools.active
    if not allow_code and not active and think is None:
        return grammar_source(fmt)
    branches: list[str] = []
    rules: list[str] = []
    first_chars = ""
    if allow_code:
        branches.append("code")
        rules += _code_rules(code, term)
        first_chars += code.open[0]
    if active:
        several = tools.parallel and tools.choice in ("auto", "required")
        branches.append("calls")
        more = max(tools.max_calls - 1, 0)
        rules.append(f'calls: call ("\\n" call){{0,{more}}}' if several and more else "calls: call")
        names = [f"fn_{i}" for i in range(len(active))]
        # SmolLM3's template shows the call's JSON on a line of its own: newlines allowed, never forced.
        rules.append(f'call: {term(TOOL_OPEN)} NL? ({" | ".join(names)}) NL? {term(TOOL_CLOSE)}')
        rules.append("NL: /\\n/")
        rules += [f"{n}: %json {json.dumps(_call_schema(t.name, t.parameters))}" for n, t in zip(names, active,
                                                                                               strict=True)]
        first_chars += "<"
    if must_code:  # tool_choice "required" with the code interpreter alone: a code call, nothing else
        branches, rules = ["code"], _code_rules(code, term)
    elif tools.answer_allowed:
        branches.append("answer")
        if fmt.type == "text":
            firsts = "".join(sorted(set(first_chars)))
            rules += ["answer: TEXT", f"TEXT: /[^{firsts}](.|\\n)*/" if firsts else "TEXT: /(.|\\n)*/"]
        else:
            rules.append("answer: %json " + json.dumps({**_schema(fmt), "x-guidance": JSON_OPTIONS}))
    start = f"start: {' | '.join(branches)}"
    if think is not None:
        # The thought ends at the closing tag or after its budget, when the grammar forces the tag; blank
        # lines may follow before the answer.
        start = f"start: think BLANK? ({' | '.join(branches)})"
        rules += [f"think: <[{think.open_token}]> thought <[{think.close_token}]>",
                  f"thought[max_tokens={think.thought_tokens}]: /(.|\\n)*/",
                  "BLANK: /[ \\n]{1,3}/"]  # bounded: a small model can emit blanks until max_tokens
    return LLMatcher.grammar_from_lark(start + "\n" + "\n".join(rules) + "\n")


def _call_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """{"name": <const>, "arguments": <parameters>} with the parameters' definitions kept at the root, so
    their "#/$defs/..." references still resolve."""
    parameters = bounded_integers(parameters)
    defs = {k: parameters[k] for k in ("$defs", "definitions") if k in parameters}
    arguments = _rebase({k: v for k, v in parameters.items() if k not in defs})
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False, **_rebase(defs),
            "x-guidance": JSON_OPTIONS}


def _rebase(node: Any) -> Any:
    """Point references to the parameters' root ("#", "#/properties/...") at their new place."""
    if isinstance(node, list):
        return [_rebase(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _rebase(v) for k, v in node.items()}
    ref = out.get("$ref")
    if isinstance(ref, str) and ref.startswith("#") and not ref.startswith(("#/$defs/", "#/definitions/")):
        out["$ref"] = "#/properties/arguments" + ref[1:]
    return out


class GrammarCache:
    """Grammars compiled for one tokenizer, least recently used evicted first."""

    def __init__(self, tokenizer: LLTokenizer, maxsize: int = 256) -> None:
        self.tokenizer = tokenizer
        self.maxsize = maxsize
        self._items: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = Lock()
        self._limits = LLParserLimits(verbose_errors=False)  # errors must not echo schemas into logs

    def get(self, fmt: ResponseFormat, allow_code: bool = False, tools: ToolUse = NO_TOOLS,
            think: ThinkBlock | None = None, code: CodeFormat = FENCE, must_code: bool = False) -> Grammar | None:
        """The grammar for one model turn (see turn_source); None when the turn is free text."""
        source = turn_source(fmt, allow_code, tools, think, self.term, code, must_code)
        if source is None:
            return None
        key = hashlib.sha256(source.encode()).hexdigest()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        grammar = self._compile(key, source, fmt)
        schemas = [fmt.schema, *(t.parameters for t in tools.active)]
        grammar = replace(grammar, ignored_formats=tuple(sorted({f for s in schemas for f in ignored_formats(s)})))
        with self._lock:
            self._items[key] = grammar
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return grammar

    def special_token(self, tag: str) -> int | None:
        """The token of `tag` when it is one special token (which text cannot spell), else None."""
        ids = self.tokenizer.tokenize_str(tag, parse_special=True)
        return ids[0] if len(ids) == 1 and self.tokenizer.is_special_token(ids[0]) else None

    def term(self, tag: str) -> str:
        """A tag in a grammar: its token where it is one special token, else quoted text."""
        token = self.special_token(tag)
        return json.dumps(tag) if token is None else f"<[{token}]>"

    def _compile(self, key: str, source: str, fmt: ResponseFormat) -> Grammar:
        is_error, messages = LLMatcher.validate_grammar_with_warnings(source, self.tokenizer, limits=self._limits)
        if is_error or messages:  # first lines only: the next ones quote the grammar, schema included
            reasons = "; ".join(m.strip().splitlines()[0] for m in messages if m.strip())
            raise SchemaError(f"Invalid schema for response_format {fmt.name!r}: {reasons}")
        matcher = LLMatcher(self.tokenizer, source, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise SchemaError(f"Invalid schema for response_format {fmt.name!r}: {matcher.get_error()}")
        return Grammar(key, source, matcher)


def compile_format(fmt: ResponseFormat, tokenizer: LLTokenizer) -> Grammar | None:
    """Compile without a cache (tests, one-off use)."""
    return GrammarCache(tokenizer, maxsize=1).get(fmt)



def warning_headers(grammar: Grammar | None) -> dict[str, str]:
    """Response headers saying what a schema asked that the grammar does not enforce (formats smolrun does not
    know, which JSON Schema 2020-12 lets a validator accept as annotations)."""
    if grammar is None or not grammar.ignored_formats:
        return {}
    return {"x-smolrun-warnings": "formats not enforced: " + ", ".join(grammar.ignored_formats)}
