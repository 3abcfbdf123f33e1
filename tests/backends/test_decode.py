"""The decode loop's text handling: stop sequences, UTF-8 across tokens, penalties, context budget."""

import pytest

from smolrun.backends.decode import decode, token_budget
from smolrun.errors import ContextLengthExceeded
from smolrun.turn import Done, SamplingParams, TextDelta
from tests.fakes import ByteModel


def generate(model: ByteModel, **params: object) -> tuple[list[str], Done]:
    events = list(decode(model, [1], SamplingParams(**params)))  # type: ignore[arg-type]
    done = events[-1]
    assert isinstance(done, Done)
    return [e.text for e in events if isinstance(e, TextDelta)], done


def test_stop_sequence_spanning_tokens_is_never_emitted() -> None:
    deltas, done = generate(ByteModel(script=b"hello END world"), temperature=0, stop=("END",), max_tokens=50)
    assert "".join(deltas) == "hello " and done.finish_reason == "stop"
    assert all("E" not in d for d in deltas)


def test_partial_stop_prefix_is_released_when_it_does_not_match() -> None:
    deltas, done = generate(ByteModel(script=b"a EN b"), temperature=0, stop=("END",), max_tokens=50)
    assert "".join(deltas) == "a EN b" and done.finish_reason == "stop"


def test_multibyte_characters_split_across_tokens_come_out_whole() -> None:
    deltas, _ = generate(ByteModel(script="héllo 漢字".encode()), temperature=0, max_tokens=50)
    assert "".join(deltas) == "héllo 漢字"
    assert all("\ufffd" not in d for d in deltas)


def test_eos_stops_and_max_tokens_cuts() -> None:
    _, done = generate(ByteModel(script=b"abc"), temperature=0, max_tokens=50)
    assert done.finish_reason == "stop" and done.stats.completion_tokens == 3
    deltas, done = generate(ByteModel(script=b"abcdef"), temperature=0, max_tokens=2)
    assert "".join(deltas) == "ab" and done.finish_reason == "length"


def test_frequency_penalty_breaks_a_repetition() -> None:
    class Repeater(ByteModel):
        def _logits(self):  # type: ignore[no-untyped-def]
            logits = super()._logits()
            logits[:] = 0
            logits[ord("a")], logits[ord("b")] = 2.0, 1.0
            return logits

    plain, _ = generate(Repeater(), temperature=0, max_tokens=6)
    assert "".join(plain) == "aaaaaa"
    penalised, _ = generate(Repeater(), temperature=0, max_tokens=6, frequency_penalty=0.6)
    assert "b" in "".join(penalised)


def test_cancellation_ends_with_cancelled() -> None:
    events = list(decode(ByteModel(seed=1), [1], SamplingParams(max_tokens=100), cancelled=lambda: True))
    assert events == [events[-1]] and isinstance(events[-1], Done) and events[-1].finish_reason == "cancelled"


def test_token_budget() -> None:
    assert token_budget(100, 30, None) == 70
    assert token_budget(100, 30, 70) == 70
    with pytest.raises(ContextLengthExceeded, match="you requested 101 tokens"):
        token_budget(100, 30, 71)
    with pytest.raises(ContextLengthExceeded):
        token_budget(100, 100, None)
