"""The DRY repetition penalty (backends/repetition.py) over byte tokens: exact penalties, what breaks a match,
what is never penalised."""

import numpy as np

from smolrun.backends.repetition import Dry


def penalties(text: bytes, multiplier: float = 1.0, base: float = 2.0, allowed: int = 2) -> dict[str, float]:
    dry = Dry(multiplier, base, allowed, lambda t: bytes([t]))
    dry.add(list(text))
    logits = np.zeros(256, dtype=np.float32)
    dry.apply(logits)
    return {chr(t): float(-logits[t]) for t in np.nonzero(logits)[0]}


def test_the_token_extending_a_repeat_is_penalised_exponentially_in_its_length() -> None:
    assert penalties(b"abcab") == {"c": 1.0}  # "ab" again: "c" would repeat "abc"
    assert penalties(b"abcabca") == {"b": 4.0}  # "abca" again: 2 ** (4 - 2)
    assert penalties(b"abcabca", multiplier=0.5, allowed=3) == {"b": 1.0}
    assert penalties(b"abca") == {}  # a repeat of one token is allowed


def test_the_longest_earlier_match_counts() -> None:
    assert penalties(b"xab1yzab2zab") == {"2": 2.0, "1": 1.0}  # "zab" (3) before "2", "ab" (2) before "1"


def test_a_newline_breaks_a_match() -> None:
    assert penalties(b"a-ba-b") == {"a": 2.0}  # "a-b" again
    assert penalties(b"a\nba\nb") == {}


def test_what_ends_a_loop_is_never_penalised() -> None:
    assert penalties(b'la"la"la') == {}  # the closing quote of a string that loops
    assert penalties(b"0,0]0,0") == {}  # the end of an array
    assert penalties(b"0,0,0,0") == {",": 8.0}  # a loop of items: the comma that goes on


def test_off_costs_nothing() -> None:
    dry = Dry(0.0, 2.0, 2, lambda t: bytes([t]))
    dry.add(list(b"abcabcabc"))
    logits = np.zeros(256, dtype=np.float32)
    dry.apply(logits)
    assert not logits.any()
