"""The constraint layer with llguidance's byte tokenizer: no model weights needed."""

import json

import jsonschema
import pytest
from llguidance import LLMatcher

from smolrun.backends.decode import decode
from smolrun.constraints import check_schema
from smolrun.constraints.grammar import GrammarCache, turn_source
from smolrun.errors import GenerationFailed, SchemaError
from smolrun.prompt.profiles import CODE_TAGS
from smolrun.turn import Done, ResponseFormat, SamplingParams, TextDelta
from tests.fakes import ByteModel, byte_tokenizer
from tests.schemas import CORPUS, obj


def run(model: ByteModel, fmt: ResponseFormat, **params: object) -> tuple[str, Done]:
    grammar = GrammarCache(model.lltokenizer).get(fmt)
    assert grammar is not None
    events = list(decode(model, [ord("x")], SamplingParams(**params), grammar.matcher()))  # type: ignore[arg-type]
    done = events[-1]
    assert isinstance(done, Done)
    return "".join(e.text for e in events if isinstance(e, TextDelta)), done


# Formats are where llguidance alone was lax: sample them harder.
SEEDS = {n: 40 for n, _, _ in CORPUS if n.startswith("format_")} | {"event": 40}


@pytest.mark.parametrize(("name", "schema", "strict"), CORPUS, ids=[c[0] for c in CORPUS])
def test_random_logits_under_the_grammar_always_validate(name: str, schema: dict, strict: bool) -> None:
    checked = check_schema(schema, strict=strict, what=name)
    for seed in range(SEEDS.get(name, 3)):
        text, done = run(ByteModel(seed), ResponseFormat("json_schema", checked, name, strict),
                         max_tokens=3000, temperature=1.0, seed=seed)
        assert done.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_property_order_follows_the_schema() -> None:
    schema = obj({"zeta": {"type": "integer"}, "alpha": {"type": "integer"}, "mid": {"type": "integer"}})
    text, _ = run(ByteModel(3), ResponseFormat("json_schema", schema), max_tokens=500, temperature=1.0, seed=3)
    assert list(json.loads(text)) == ["zeta", "alpha", "mid"]


def test_json_object_mode_gives_an_object() -> None:
    text, done = run(ByteModel(5), ResponseFormat("json_object"), max_tokens=3000, temperature=1.0, seed=5)
    assert done.finish_reason == "stop"
    assert isinstance(json.loads(text), dict)


def test_forced_tokens_are_evaluated_in_one_batch() -> None:
    schema = obj({"first_name": {"type": "string"}, "last_name": {"type": "string"}})
    model = ByteModel(script=b'{"first_name":"Al","last_name":"Bo"}')
    text, done = run(model, ResponseFormat("json_schema", schema), max_tokens=200, temperature=0)
    assert text == '{"first_name":"Al","last_name":"Bo"}'
    # `{"first_name":"` is forced after `{`, and `,"last_name":"` after the closing quote.
    assert [b'{"first_name":"', b'","last_name":"'] == [bytes(c) for c in model.calls[1:] if len(c) > 1][:2]
    assert done.stats.forced_tokens >= 27
    assert done.stats.forward_passes < done.stats.completion_tokens


def test_the_grammar_overrides_a_model_that_wants_invalid_output() -> None:
    schema = obj({"n": {"type": "integer", "minimum": 0, "maximum": 9}})
    text, done = run(ByteModel(script=b'{"n":"ten"}'), ResponseFormat("json_schema", schema), max_tokens=50,
                     temperature=0)
    jsonschema.validate(json.loads(text), schema)


def test_max_tokens_cut_reports_length() -> None:
    schema = obj({"s": {"type": "string"}})
    text, done = run(ByteModel(script=b'{"s":"' + b"a" * 100 + b'"}'), ResponseFormat("json_schema", schema),
                     max_tokens=20, temperature=0)
    assert done.finish_reason == "length"
    assert done.stats.completion_tokens == 20 and len(text) == 20


def test_a_matcher_error_is_raised_never_a_short_answer() -> None:
    model = ByteModel(seed=0)
    grammar = GrammarCache(model.lltokenizer).get(ResponseFormat("json_object"))
    assert grammar is not None
    matcher = grammar.matcher()
    matcher.consume_token(ord("x"))  # not JSON: the matcher enters its error state
    with pytest.raises(GenerationFailed, match="grammar"):
        list(decode(model, [1], SamplingParams(max_tokens=10), matcher))


def test_grammars_are_cached_by_schema_and_matchers_are_independent() -> None:
    cache = GrammarCache(byte_tokenizer())
    a = ResponseFormat("json_schema", obj({"a": {"type": "string"}}))
    assert cache.get(a) is cache.get(ResponseFormat("json_schema", obj({"a": {"type": "string"}}), name="other"))
    assert cache.get(a) is not cache.get(ResponseFormat("json_schema", obj({"b": {"type": "string"}})))
    assert cache.get(ResponseFormat()) is None
    grammar = cache.get(a)
    assert grammar is not None
    m1, m2 = grammar.matcher(), grammar.matcher()
    assert m1.consume_tokens(list(b'{"a":"'))
    assert not m2.is_error() and m2.consume_token(ord("{"))


def test_llguidance_refusals_become_schema_errors() -> None:
    cache = GrammarCache(byte_tokenizer())
    overlapping = obj({"v": {"oneOf": [{"type": "string"}, {"type": "string", "minLength": 2}]}})
    with pytest.raises(SchemaError, match="oneOf"):
        cache.get(ResponseFormat("json_schema", overlapping, "v"))


def accepts(source: str, text: str) -> bool:
    """Whether a grammar takes `text`, byte by byte, as a whole turn."""
    matcher = LLMatcher(byte_tokenizer(), source, log_level=0)
    return matcher.consume_tokens(list(text.encode())) and matcher.is_accepting()


def test_code_in_tags_is_one_lazy_lexeme() -> None:
    source = turn_source(ResponseFormat(), allow_code=True, code=CODE_TAGS)
    assert source is not None

    assert accepts(source, "<code>x = '<b>'\nprint(x)</code>")
    assert accepts(source, "The answer is 42.")
    assert not accepts(source, "<code>print(1)</code> and more")  # the code call is the whole turn
    assert not accepts(source, "<b>bold</b>")  # free text may not start like a code call


def test_unbounded_integers_are_capped_at_the_largest_exact_double() -> None:
    from smolrun.constraints.grammar import MAX_SAFE_INTEGER, bounded_integers

    schema = {"type": "object", "properties": {
        "n": {"type": "integer"}, "own": {"type": "integer", "maximum": 10**20}, "maybe": {"type": ["integer", "null"]},
        "enum": {"type": "integer", "exclusiveMinimum": 0}, "x": {"type": "number"}},
        "$defs": {"k": {"type": "integer", "const": 5}}}
    assert bounded_integers(schema) == {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": -MAX_SAFE_INTEGER, "maximum": MAX_SAFE_INTEGER},
        "own": {"type": "integer", "maximum": 10**20, "minimum": -MAX_SAFE_INTEGER},
        "maybe": {"type": ["integer", "null"], "minimum": -MAX_SAFE_INTEGER, "maximum": MAX_SAFE_INTEGER},
        "enum": {"type": "integer", "exclusiveMinimum": 0, "maximum": MAX_SAFE_INTEGER},
        "x": {"type": "number"}},
        "$defs": {"k": {"type": "integer", "const": 5, "minimum": -MAX_SAFE_INTEGER, "maximum": MAX_SAFE_INTEGER}}}
    grammar = GrammarCache(byte_tokenizer()).get(ResponseFormat("json_schema", {
        "type": "object", "properties": {"n": {"type": "integer"}, "own": {"type": "integer", "maximum": 10**18}},
        "required": ["n", "own"], "additionalProperties": False}))
    assert grammar is not None
    source = grammar.source
    assert accepts(source, '{"n":9007199254740991,"own":1}') and accepts(source, '{"n":-9007199254740991,"own":1}')
    assert not accepts(source, '{"n":9007199254740992,"own":1}')  # one past the cap
    assert accepts(source, '{"n":1,"own":1000000000000000000}')  # the schema's own bound wins


def test_a_required_code_call_leaves_no_other_branch() -> None:
    source = turn_source(ResponseFormat(), allow_code=True, must_code=True)
    assert source is not None

    assert accepts(source, "```python\nprint(1)\n```")
    assert not accepts(source, "Hello") and not accepts(source, "")
