"""The decode loop: stop sequences, UTF-8 across tokens, penalties, the repetition breaker, context budget, and a JSON
answer closed within its budget."""

import numpy as np
import pytest

from smolrun.backends.decode import decode, token_budget
from smolrun.engine import Engine
from smolrun.errors import ContextLengthExceeded, InvalidRequest
from smolrun.turn import NO_TOOLS, Done, Message, ResponseFormat, SamplingParams, TextDelta, Tool, ToolUse, Turn
from tests.fakes import EOS, ByteModel


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


class Looper(ByteModel):
    """Once in a string, writes "la " forever; its second choice is the closing quote, then "}", then EOS."""

    def _logits(self):  # type: ignore[no-untyped-def]
        text = b"".join(bytes(c) for c in self.calls[1:])
        run = text[text.rfind(b'"') + 1:]
        logits = np.full(self.n_vocab, -10.0, dtype=np.float32)
        logits[b"la "[len(run) % 3]] = 10.0
        logits[ord('"')], logits[ord("}")], logits[EOS] = 8.0, 7.0, 6.0
        return logits


NAME = ResponseFormat("json_schema", {"type": "object", "properties": {"name": {"type": "string"}},
                                      "required": ["name"], "additionalProperties": False}, "name", True)


def answer(fmt: ResponseFormat, tools: ToolUse = NO_TOOLS, **params: object) -> tuple[str, Done]:
    engine = Engine(Looper())
    turn = Turn((Message("user", "a name"),), fmt, SamplingParams(temperature=0, **params), tools)  # type: ignore[arg-type]
    events = list(engine.generate(engine.prepare(turn)))
    done = events[-1]
    assert isinstance(done, Done)
    return "".join(e.text for e in events if isinstance(e, TextDelta)), done


def test_the_repetition_breaker_ends_a_loop_inside_a_string() -> None:
    text, done = answer(NAME, max_tokens=400)  # the breaker is on by default for JSON
    assert (text, done.finish_reason, done.stats.closed) == ('{"name":"la la l"}', "stop", False)
    text, done = answer(NAME, max_tokens=40, dry_multiplier=0.0)
    assert text == '{"name":"la la la la la la la la la la"}'  # looped to the budget, then closed there
    assert (done.finish_reason, done.stats.closed, done.stats.completion_tokens) == ("length", True, 40)


def test_past_a_quarter_of_the_budget_the_lean_ends_the_value() -> None:
    # The DRY penalty kept out of reach: the lean alone. After 10 of the 40 tokens the closing quote (logit 8,
    # the loop's 10) gains 50 * (used - 0.25) / 0.75: 3.3 at the 12th token, where it wins.
    text, done = answer(NAME, max_tokens=40, dry_allowed_length=64)
    assert (text, done.finish_reason, done.stats.closed) == ('{"name":"la "}', "stop", False)
    text, done = answer(NAME, max_tokens=80, dry_allowed_length=64)  # 20 tokens free, 2.5 at the 24th
    assert (text, done.finish_reason) == ('{"name":"la la la la la"}', "stop")


def test_free_text_loops_without_the_breaker_unless_asked() -> None:
    text, done = answer(ResponseFormat(), max_tokens=12)
    assert (text, done.finish_reason) == ("la la la la ", "length")
    text, _ = answer(ResponseFormat(), max_tokens=12, dry_multiplier=0.8)
    assert text == 'la la l"la l'  # the breaker moved it to its second choice


def test_a_cut_closes_the_document_with_what_the_schema_requires() -> None:
    fmt = ResponseFormat("json_schema", {"type": "object", "required": ["name", "tags"], "properties": {
        "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string", "minLength": 2},
                                             "minItems": 2}}}, "x", False)
    text, done = answer(fmt, max_tokens=33, dry_multiplier=0.0)
    assert (text, done.finish_reason, done.stats.closed) == ('{"name":"la ","tags":["aa","aa"]}', "length", True)
    assert done.stats.completion_tokens == 33


def test_a_budget_below_the_shortest_document_is_refused_naming_it() -> None:
    fmt = ResponseFormat("json_schema", {"type": "array", "items": {"type": "integer"}, "minItems": 20}, "x", False)
    with pytest.raises(InvalidRequest) as refused:
        answer(fmt, max_tokens=40)
    assert refused.value.param == "max_tokens"
    assert refused.value.message == ("The shortest JSON document that the response format allows takes 41 tokens, "
                                     "but max_tokens is 40: raise max_tokens to at least 41.")
    text, done = answer(fmt, max_tokens=41)
    assert (text, done.finish_reason) == ("[" + ",".join(["0"] * 20) + "]", "length")


def test_function_call_arguments_are_never_closed() -> None:
    tools = ToolUse((Tool("lookup", {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"],
                                     "additionalProperties": False}, strict=True),), choice="required")
    text, done = answer(NAME, tools, max_tokens=60, dry_multiplier=0.0)
    assert text == '<tool_call>\n{"name":"lookup","arguments":{"q":"la la la la l'  # cut, as without closing
    assert (done.finish_reason, done.stats.closed) == ("length", False)


def test_near_the_end_the_lean_follows_the_way_out_where_a_pattern_holds_the_quote() -> None:
    # The quote is masked until the string ends in "x", which the model never writes by itself (logit -10):
    # the closing's first token ("x") gains the lean's bonus too, 50 * (used - 0.25) / 0.75, past 20 (its gap
    # to the loop's 10) once 24 of the 40 tokens are out, the forced '{"name":"' among them; then the quote
    # (8 + the bonus) beats the loop.
    fmt = ResponseFormat("json_schema", {"type": "object", "properties": {"name": {
        "type": "string", "pattern": "^(la )*x$"}}, "required": ["name"], "additionalProperties": False}, "n", True)
    text, done = answer(fmt, max_tokens=40, dry_allowed_length=64)
    assert (text, done.finish_reason, done.stats.closed) == ('{"name":"la la la la la x"}', "stop", False)


def test_penalties_subtract_each_seen_tokens_count_times_frequency_plus_presence() -> None:
    from smolrun.backends.decode import _Penalties

    penalties = _Penalties(frequency=0.5, presence=0.25)
    tokens = [t % 100 for t in range(150)] + [7, 7]  # past the first 64 places: the arrays grow
    penalties.add(tokens)
    logits = np.zeros(200, dtype=np.float32)
    penalties.apply(logits)
    counts = np.bincount(tokens, minlength=200).astype(np.float32)
    expected = -(counts * 0.5 + np.where(counts > 0, 0.25, 0.0)).astype(np.float32)
    assert np.array_equal(logits, expected)
    assert logits[7] == -(4 * 0.5 + 0.25) and logits[150] == 0.0
