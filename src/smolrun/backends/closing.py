"""Finishing a JSON answer within its token budget: a short way from the grammar's state to a valid document.

The grammar knows what may come next but not how far the end is, so a search walks it: at each step it asks
the matcher which bytes are allowed and takes the one that closes soonest (the innermost string or container,
else the cheapest value, the next required key), trying a byte on a copy before taking it where a string or
a number must go on. Forced bytes (keys, the rest of `true`) are taken as the grammar's fast-forward tokens.
Every token the search writes is one the matcher accepted, so what it returns is a valid end whatever the
schema; it is short, not always the shortest. It tries bytes by consuming and rolling back, so it needs a
grammar that can roll back (llguidance cannot past a lexeme with a token limit, such as the think block's).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from re import _parser as re_parser  # type: ignore[attr-defined]  # the stdlib's own regex parser
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from llguidance import LLMatcher, LLTokenizer

from smolrun.errors import GenerationFailed

Phase = Literal["gap", "json", "other"]

_QUOTE, _BACKSLASH, _COMMA, _COLON = ord('"'), ord("\\"), ord(","), ord(":")
_BLANKS = frozenset(b" \n\r\t")
_JSON_STARTS = frozenset(b'{["-0123456789tfn')
# Where a value starts, in the order of the shortest value each byte begins.
_VALUE_STARTS = b'0123456789"[ntf{-'
_NUMBER = b"0123456789.-+eE"
# A string's bytes by kind: one of each kind is tried, so that a pattern that wants a digit or an "@" gets it.
_STRING_KINDS = (b"abcdefghijklmnopqrstuvwxyz", b"0123456789", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"@", b".", b"-",
                 b"_", b" ", b":", b"/", b"+", b"#", b"!$%&'()*,;<=>?[]^`{|}~")
_ESCAPES = b'n"\\/bfrtu'
_ENDERS = b'"]}'
_TRAILING = frozenset(b"]} \n\r\t")  # what may follow in a token that ends a value: more ends, never a new start
_SEARCH_LIMIT = 4096  # tokens: a document needing more is not closed (the cut is as without closing)
_STUCK_LIMIT = 64  # string bytes written without seeing how the string ends: the search gives up


@dataclass(frozen=True)
class Vocabulary:
    """The tokens the search writes with (one token per byte, where the vocabulary has it), and the tokens that
    end a value (`enders`, by their first byte: a quote, a bracket or a brace, then only more brackets, braces
    or blanks, so not `"},{"`, which goes on), which the lean near the budget favours."""

    byte_tokens: tuple[int, ...]  # indexed by byte value; -1 where no token is that byte alone
    enders: dict[int, npt.NDArray[np.int64]] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def of(cls, tokenizer: LLTokenizer) -> Vocabulary:
        found = [-1] * 256
        enders: dict[int, list[int]] = {b: [] for b in _ENDERS}
        for token in range(tokenizer.vocab_size):
            if tokenizer.is_special_token(token):
                continue
            data = tokenizer.decode_bytes([token])
            if len(data) == 1 and found[data[0]] < 0:
                found[data[0]] = token
            if data and data[0] in enders and all(b in _TRAILING for b in data[1:]):
                enders[data[0]].append(token)
        return cls(tuple(found), {b: np.array(t, dtype=np.int64) for b, t in enders.items()})


@dataclass(frozen=True)
class Closing:
    """What closing one turn's JSON answer needs: the vocabulary; from the schema (see `schema_hints`) the names
    it requires somewhere (the key to write where an object still lacks one), texts that its patterns want (the
    literal parts, and a shortest match of each), every property name (to finish a key begun) and every string
    its enums and consts list (to finish a value begun); and whether the turn's grammar has other branches
    (code, function calls), whose start is never closed."""

    tokenizer: LLTokenizer
    vocabulary: Vocabulary
    keys: tuple[bytes, ...] = ()
    texts: tuple[bytes, ...] = ()
    names: tuple[bytes, ...] = ()
    values: tuple[bytes, ...] = ()
    answer_only: bool = True

    def scan(self) -> JsonScan:
        return JsonScan("gap")


@dataclass
class JsonScan:
    """Where a turn's text is in its JSON answer: inside a string or not, which containers are open, which keys
    each open object has. Fed every token the turn generates."""

    phase: Phase
    stack: list[bytes] = field(default_factory=list)  # b"{" or b"[" for each open container
    keys: list[set[bytes]] = field(default_factory=list)  # keys written in each open object
    in_string: bool = False
    escape: bool = False
    in_key: bool = False  # the open string is a key
    expect_key: bool = False  # an object's next string is a key
    chars: bytearray = field(default_factory=bytearray)  # the open string's bytes so far, as written

    def copy(self) -> JsonScan:
        return JsonScan(self.phase, list(self.stack), [set(k) for k in self.keys],
                        self.in_string, self.escape, self.in_key, self.expect_key, bytearray(self.chars))

    def feed(self, data: bytes) -> None:
        for byte in data:
            self._byte(byte)

    def _byte(self, b: int) -> None:
        if self.phase == "gap":
            if b in _BLANKS:
                return
            self.phase = "json" if b in _JSON_STARTS else "other"
        if self.phase != "json":
            return
        if self.in_string:
            if self.escape:
                self.escape = False
            elif b == _BACKSLASH:
                self.escape = True
            elif b == _QUOTE:
                self.in_string = False
                if self.in_key and self.keys:
                    self.keys[-1].add(bytes(self.chars))
                return
            self.chars.append(b)
            return
        if b == _QUOTE:
            self.in_string, self.in_key, self.expect_key = True, self.expect_key, False
            self.chars.clear()
        elif b in b"{[":
            self.stack.append(bytes([b]))
            self.keys.append(set())
            self.expect_key = b == ord("{")
        elif b in b"}]" and self.stack:
            self.stack.pop()
            self.keys.pop()
            self.expect_key = False
        elif b == _COMMA:
            self.expect_key = bool(self.stack) and self.stack[-1] == b"{"

    @property
    def closer(self) -> int | None:
        """The byte that closes what is open innermost."""
        if self.in_string:
            return _QUOTE
        if self.stack:
            return ord("}") if self.stack[-1] == b"{" else ord("]")
        return None


def shortest_close(matcher: LLMatcher, scan: JsonScan, closing: Closing,
                   limit: int = _SEARCH_LIMIT) -> list[int] | None:
    """Tokens that take `matcher` (left as it is) to the end of a valid document, or None when the turn is not
    in its JSON answer (code, function calls) or no end was found within `limit` tokens."""
    search = _Search(matcher.deep_copy(), scan.copy(), closing)
    tokens = search.run(limit)
    return None if tokens is None else _fewer_tokens(matcher, tokens, closing)


class _Search:
    def __init__(self, matcher: LLMatcher, scan: JsonScan, closing: Closing) -> None:
        self.m, self.scan, self.closing = matcher, scan, closing
        self.bytes = closing.vocabulary.byte_tokens
        self.mask = b""
        self.stuck = 0  # string bytes taken in a row after which the string still could not end
        self.used: set[tuple[int, ...]] = set()  # pattern texts written in the open string

    def run(self, limit: int) -> list[int] | None:
        out: list[int] = []
        while not self.m.is_accepting():
            if len(out) >= limit or self.scan.phase == "other" or self.m.is_error():
                return None
            step = self.m.compute_ff_tokens() or self._choose()
            if not step or not self.m.consume_tokens(step):
                return None
            for token in step:
                self.scan.feed(self.closing.tokenizer.decode_bytes([token]))
            out += step
        return out

    def _allowed(self, token: int) -> bool:
        return token >= 0 and bool(self.mask[token >> 3] >> (token & 7) & 1)

    def _byte(self, b: int) -> int:
        """The token of byte `b` if the grammar allows it next, else -1."""
        token = self.bytes[b]
        return token if self._allowed(token) else -1

    def _first(self, candidates: bytes) -> int:
        return next((t for t in (self._byte(b) for b in candidates) if t >= 0), -1)

    def _choose(self) -> list[int]:
        self.mask = self.m.compute_bitmask()
        scan = self.scan
        if scan.in_string:
            return self._in_string()
        self.stuck = 0
        self.used.clear()
        for b in (scan.closer, _COMMA, _COLON):
            if b is not None and (token := self._byte(b)) >= 0:
                return [token]
        token = self._lookahead(_NUMBER, self._ends_value)
        if token < 0:
            token = self._first(_VALUE_STARTS)
        return [token] if token >= 0 else self._any()

    def _in_string(self) -> list[int]:
        scan = self.scan
        if scan.escape:
            token = self._first(_ESCAPES)
            return [token] if token >= 0 else self._any()
        if (token := self._byte(_QUOTE)) >= 0:
            return [token]
        if scan.in_key and not scan.chars:
            key = self._required_key()
            if key:
                return key
        if (rest := self._complete()) is not None:
            return rest
        kinds = [t for t in (self._first(kind) for kind in _STRING_KINDS) if t >= 0]
        if not kinds:
            return self._any()
        for token in kinds:
            if self._try([token], self._quote_allowed):
                return [token]
        # A pattern may want a literal first ("^file:.+\\.geodatabase$"): the schema's own pattern texts.
        texts = [t for t in ([self.bytes[b] for b in text] for text in self.closing.texts) if t and min(t) >= 0]
        for tokens in texts:
            if self._try(tokens, self._quote_allowed):
                return tokens
        for token in kinds:
            if any(self._try([token, second], self._quote_allowed) for second in kinds):
                return [token]
        self.stuck += 1
        if self.stuck > _STUCK_LIMIT:
            return []
        if self.stuck % 4 == 0:  # a new kind of byte comes next: a text may follow it ("\\d{3}-[A-Z]{2}")
            self.used.clear()
        for tokens in texts:  # each once per kind of byte, since a pattern may repeat it without end
            if tuple(tokens) not in self.used and self._try(tokens, lambda: True):
                self.used.add(tuple(tokens))
                return tokens
        # No short way to end the string was seen: go on with one kind of byte, moving to another now and then.
        return [kinds[(self.stuck // 4) % len(kinds)]]

    def _required_key(self) -> list[int]:
        """A required name the open object lacks, with its closing quote, if the grammar allows it here."""
        written = self.scan.keys[-1] if self.scan.keys else set()
        for name in self.closing.keys:
            if name in written:
                continue
            tokens = [self.bytes[b] for b in name + b'"']
            if min(tokens) >= 0 and self._try(tokens, lambda: True):
                return tokens
        return []

    def _complete(self) -> list[int] | None:
        """The rest of a property name (in a key) or of an enum's string (in a value) that the open string
        begins, with its closing quote, if the grammar takes it: names not yet in the object first, shortest
        first."""
        scan = self.scan
        begun = bytes(scan.chars)
        if scan.in_key:
            written = scan.keys[-1] if scan.keys else set()
            candidates = sorted(self.closing.names, key=lambda n: (n in written, len(n)))
        else:
            candidates = sorted(self.closing.values, key=len)
        for text in candidates:
            if len(text) < len(begun) or not text.startswith(begun):
                continue
            tokens = [self.bytes[b] for b in text[len(begun):] + b'"']
            if min(tokens) >= 0 and self._try(tokens, lambda: True):
                return tokens
        return None

    def _lookahead(self, candidates: bytes, ends: object) -> int:
        """The first allowed candidate after which `ends()` holds, or -1."""
        assert callable(ends)
        for b in candidates:
            token = self._byte(b)
            if token >= 0 and self._try([token], ends):
                return token
        return -1

    def _try(self, tokens: list[int], check: object) -> bool:
        """Whether the grammar takes `tokens` and `check()` holds after them; the matcher is left as it was."""
        assert callable(check)
        taken = self.m.try_consume_tokens(tokens)
        ok = taken == len(tokens) and bool(check())
        self.m.rollback(taken)
        return ok

    def _quote_allowed(self) -> bool:
        return self._try([self.bytes[_QUOTE]], lambda: True)

    def _ends_value(self) -> bool:
        if self.m.is_accepting():
            return True
        closer = self.scan.closer
        return any(self._try([self.bytes[b]], lambda: True) for b in (_COMMA, closer) if b is not None)

    def _any(self) -> list[int]:
        """Any allowed token: the first allowed byte, else the first allowed token."""
        for b in range(256):
            if (token := self._byte(b)) >= 0:
                return [token]
        for token in range(len(self.mask) * 8):
            if self._allowed(token):
                return [token]
        return []


def _fewer_tokens(matcher: LLMatcher, tokens: list[int], closing: Closing) -> list[int]:
    """The same bytes in the tokenizer's own (usually fewer) tokens, where the grammar takes them."""
    tokenizer = closing.tokenizer
    shorter = tokenizer.tokenize_bytes(tokenizer.decode_bytes(tokens))
    if len(shorter) >= len(tokens):
        return tokens
    copy = matcher.deep_copy()
    if copy.try_consume_tokens(shorter) == len(shorter) and copy.is_accepting():
        return shorter
    return tokens


def schema_hints(schema: object) -> tuple[tuple[bytes, ...], tuple[bytes, ...], tuple[bytes, ...], tuple[bytes, ...]]:
    """From `schema`, for `Closing`: the names some object requires, texts its patterns want (literal parts and
    a shortest match), every property name, and the strings its enums and consts list; each as the bytes that
    stand between the quotes in JSON."""
    keys: dict[bytes, None] = {}
    texts: dict[bytes, None] = {}
    names: dict[bytes, None] = {}
    values: dict[bytes, None] = {}
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack += node
        elif isinstance(node, dict):
            required = node.get("required")
            if isinstance(required, list):
                keys.update((_inner(name), None) for name in required if isinstance(name, str))
            pattern = node.get("pattern")
            if isinstance(pattern, str):
                texts.update((text.encode(), None) for text in pattern_literals(pattern))
                if example := pattern_example(pattern):
                    texts[_inner(example)] = None
            properties = node.get("properties")
            if isinstance(properties, dict):
                names.update((_inner(name), None) for name in properties)
            enum = node.get("enum")
            listed: list[Any] = enum if isinstance(enum, list) else [node.get("const")]
            values.update((_inner(v), None) for v in listed if isinstance(v, str))
            stack += [v for v in node.values() if isinstance(v, dict | list)]
    return tuple(keys), tuple(texts), tuple(names), tuple(values)


def _inner(text: str) -> bytes:
    """A string as JSON writes it between its quotes."""
    return json.dumps(text, ensure_ascii=False)[1:-1].encode()


def pattern_example(pattern: str, limit: int = 256) -> str | None:
    """A short string that `pattern` matches (each repetition at its least, the shortest branch, the first
    character of each class), or None where Python's parser cannot read it or the example would be long. Only a
    hint: the search writes it only where the grammar takes it."""
    try:
        text = _example(re_parser.parse(pattern), {})
    except (re.error, ValueError, RecursionError, KeyError, OverflowError):
        return None
    return text if len(text) <= limit and re.search(pattern, text) else None


_CATEGORY = {"CATEGORY_DIGIT": "0", "CATEGORY_NOT_DIGIT": "a", "CATEGORY_SPACE": " ", "CATEGORY_NOT_SPACE": "a",
             "CATEGORY_WORD": "a", "CATEGORY_NOT_WORD": "-"}
_CLASS = {"CATEGORY_DIGIT": r"\d", "CATEGORY_NOT_DIGIT": r"\D", "CATEGORY_SPACE": r"\s", "CATEGORY_NOT_SPACE": r"\S",
          "CATEGORY_WORD": r"\w", "CATEGORY_NOT_WORD": r"\W"}


def _example(pattern: Any, groups: dict[int, str]) -> str:
    out = []
    for op, arg in pattern:
        name = str(op)
        if name == "LITERAL":
            out.append(chr(arg))
        elif name == "NOT_LITERAL":
            out.append("a" if arg != ord("a") else "b")
        elif name == "ANY":
            out.append("a")
        elif name == "IN":
            out.append(_in_class(arg))
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, _, sub = arg
            out.append(_example(sub, groups) * low)
        elif name == "SUBPATTERN":
            group, _, _, sub = arg
            text = _example(sub, groups)
            if group is not None:
                groups[group] = text
            out.append(text)
        elif name == "BRANCH":
            out.append(min((_example(branch, groups) for branch in arg[1]), key=len))
        elif name == "GROUPREF":
            out.append(groups[arg])
        elif name in ("AT", "ASSERT", "ASSERT_NOT"):
            continue
        else:
            raise ValueError(name)
    return "".join(out)


def _in_class(items: list[tuple[Any, Any]]) -> str:
    """A character of a class: its first member, or, for a negated class, a common character outside it."""
    if items and str(items[0][0]) == "NEGATE":
        members = items[1:]
        return next(c for c in "a0A_-. x" if not any(_member(c, op, arg) for op, arg in members))
    op, arg = items[0]
    name = str(op)
    if name == "LITERAL":
        return chr(arg)
    if name == "RANGE":
        return chr(arg[0])
    if name == "CATEGORY":
        return _CATEGORY[str(arg)]
    raise ValueError(name)


def _member(c: str, op: Any, arg: Any) -> bool:
    name = str(op)
    if name == "LITERAL":
        return bool(ord(c) == arg)
    if name == "RANGE":
        return bool(arg[0] <= ord(c) <= arg[1])
    if name == "CATEGORY":
        return re.fullmatch(_CLASS[str(arg)], c) is not None
    raise ValueError(name)


_META = frozenset("^$.|?*+()[]{}\\")


def pattern_literals(pattern: str) -> list[str]:
    """Runs of plain characters in a regular expression ("10\\\\..+/.+" -> ["10.", "/"]); a character that a
    quantifier makes optional or repeats is left out of its run."""
    runs: list[str] = []
    run = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern) and not pattern[i + 1].isalnum():
            char, i = pattern[i + 1], i + 2
        elif c not in _META:
            char, i = c, i + 1
        else:
            if c in "?*+{" and run:
                run = run[:-1]
            if run:
                runs.append(run)
            run = ""
            i += 1
            if c == "[":  # a class: skip to its end
                while i < len(pattern) and pattern[i] != "]":
                    i += 2 if pattern[i] == "\\" else 1
                i += 1
            elif c == "{":  # a count
                i = pattern.find("}", i) + 1 or len(pattern)
            elif c == "\\":
                i += 1  # \d, \w ...: a class
            continue
        run += char
    if run:
        runs.append(run)
    return runs


LEAN_FROM = 0.25  # share of the budget after which the innermost value is eased towards its end
LEAN_MAX = 50.0  # the logit bonus of the tokens that end it, at the budget's end
WINDOW = 128  # tokens: closer to the end than twice the last closing's length plus this, it is kept up to date
REFRESH = 32  # tokens: the shortest interval between two measures of the closing's length before the end is near


class Closer:
    """One sequence's closing at its budget, beside its decoding: while the end is near it knows a closing from
    the matcher's current state that fits the tokens left, and when the next token would leave too little
    room for one, that closing is written instead. Far from the end it only follows the text (cheap)."""

    def __init__(self, matcher: LLMatcher, closing: Closing, plan: tuple[int, ...] | None = None) -> None:
        self.m, self.closing = matcher, closing
        self.scan = closing.scan()
        self.plan = list(plan) if plan is not None else None  # a closing from the current state, when known
        self.size = len(plan) if plan is not None else 0  # the last closing's length: how near "near" is
        self.off = False  # not closable (code or calls, or a state the search could not close)
        self.since = 0  # tokens since the closing's length was last measured
        self.tracking = False  # the end came near: a closing is kept at hand from then on
        self.search_us: list[float] = []

    def near(self, room: int) -> bool:
        """Whether the end is near enough to keep a closing at hand; once it is, it stays so (the closing may
        shrink as the document nears its end, then grow again in one forced run of tokens)."""
        self.tracking = self.tracking or room <= 2 * self.size + WINDOW
        return self.tracking

    def before(self, room: int) -> list[int] | None:
        """Before a token is sampled, with `room` tokens left: the closing, consumed, when it takes all the room
        (nothing may be sampled any more), else None."""
        if self.off:
            return None
        if self.plan is None and self.near(room):
            self.plan = self._search(room)
            if self.plan is None or len(self.plan) > room:
                self.off, self.plan = True, None
                return None
        if self.plan is not None and len(self.plan) >= room:
            return self._write(self.plan)
        return None

    def after(self, batch: list[int], room: int) -> list[int]:
        """`batch` was consumed, leaving `room` tokens: the tokens to keep. That is `batch`, unless no closing
        fits after it: then it is taken back and the closing from before it is consumed in its place."""
        if self.off:
            if self.scan.phase == "json":  # the lean still reads where the answer is
                self.scan.feed(self.closing.tokenizer.decode_bytes(batch))
            return batch
        previous = self.plan
        scan = self.scan.copy() if previous is not None else None
        self.scan.feed(self.closing.tokenizer.decode_bytes(batch))
        if self.scan.phase == "other":
            self.off, self.plan = True, None
            return batch
        if not self.near(room):
            self.plan = None
            self.since += len(batch)
            # Deep in a document the way out may grow, and "near" must grow with it; far from the end, where only
            # a very large jump could matter, it is measured less often.
            if self.since >= max(REFRESH, (room - 2 * self.size - WINDOW) // 8):
                self._search(room)
            return batch
        plan = self._still(previous) or self._search(room)
        if plan is not None and len(plan) <= room:
            self.plan = plan
            return batch
        if previous is None or scan is None:  # the end came nearer than the last look saw: nothing to fall back on
            self.off, self.plan = True, None
            return batch
        self.m.rollback(len(batch))
        self.scan = scan
        return self._write(previous)

    def lean(self, logits: npt.NDArray[np.float32], room: int, budget: int) -> None:
        """Past `LEAN_FROM` of the budget, raise (in place) the logits of the tokens that end the innermost open
        value, and near the end the first token of the closing known, up to `LEAN_MAX` at the budget's end: a
        model that has not finished by then, often in a loop, ends the document itself. Probabilities only: the
        mask still decides what may come."""
        used = 1 - room / budget
        closer = self.scan.closer if self.scan.phase == "json" else None
        if used <= LEAN_FROM or closer is None:
            return
        bonus = np.float32(LEAN_MAX * (used - LEAN_FROM) / (1 - LEAN_FROM))
        tokens = self.closing.vocabulary.enders.get(closer)
        if tokens is not None and tokens.size:
            logits[tokens[tokens < logits.shape[0]]] += bonus
        # Near the end, the way out too: where a pattern holds the quote back, it says what the string still needs.
        first = self.plan[0] if self.plan else -1
        if 0 <= first < logits.shape[0] and (tokens is None or not (tokens == first).any()):
            logits[first] += bonus

    def _write(self, plan: list[int]) -> list[int]:
        if plan and not self.m.consume_tokens(plan):  # a bug: the search took every token on a copy first
            raise GenerationFailed(f"the grammar refused the closing {plan}: {self.m.get_error()}")
        self.plan, self.off = [], True
        return plan

    def _still(self, plan: list[int] | None) -> list[int] | None:
        """`plan` if it also closes the new state (a string that only grew), else None."""
        if plan is None:
            return None
        taken = self.m.try_consume_tokens(plan)
        ok = taken == len(plan) and self.m.is_accepting()
        self.m.rollback(taken)
        return plan if ok else None

    def _search(self, room: int) -> list[int] | None:
        started = time.perf_counter()
        plan = shortest_close(self.m, self.scan, self.closing)
        self.search_us.append((time.perf_counter() - started) * 1e6)
        self.since = 0
        if plan is not None:
            self.size = len(plan)
        return plan
