"""Chat Completions logprobs on the real bundled model through the official openai SDK: the model's own log
probabilities after the grammar's mask, checked against a direct evaluation of the same prefixes."""

from __future__ import annotations

import math

import numpy as np
import openai
import pytest

from smolrun.backends.base import Feed
from smolrun.backends.llama_cpp import LlamaCppModel
from smolrun.turn import Message, Reasoning, Turn
from tests.conftest import Server, bundled_gguf

pytestmark = pytest.mark.model
MODEL = "smollm2-135m"
ASK = [{"role": "user", "content": "Name three colors."}]


def test_greedy_logprobs_are_the_models_own_at_every_step(server: Server) -> None:
    # A seed: the prompt is evaluated whole, alone, from an empty cache, as the direct evaluation below does it.
    completion = server.client().chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0,
                                                         seed=0, logprobs=True, top_logprobs=5)
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert len(entries) == completion.usage.completion_tokens > 5  # type: ignore[union-attr]
    assert "".join(e.token for e in entries) == choice.message.content

    # The same prefixes evaluated directly on a model of our own: each step's log-softmax over the vocabulary.
    prompt = server.engine.prepare(Turn((Message("user", "Name three colors."),), reasoning=Reasoning("none"))).prompt
    model = LlamaCppModel(bundled_gguf(), name="direct", n_ctx=1024, n_threads=2, n_seq=1)
    logits = model.decode([Feed(0, 0, prompt, True)])[0]
    at = len(prompt)
    for entry in entries:
        scores = logits.astype(np.float64)
        scores -= scores.max() + math.log(np.exp(scores - scores.max()).sum())
        best = np.argsort(-scores, kind="stable")[:5]
        assert entry.bytes == list(model.token_bytes(int(best[0])))  # greedy: the likeliest token
        assert entry.logprob == pytest.approx(scores[best[0]], abs=1e-3)
        assert [t.bytes for t in entry.top_logprobs] == [list(model.token_bytes(int(t))) for t in best]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([scores[t] for t in best], abs=1e-3)
        logits = model.decode([Feed(0, at, [int(best[0])], True)])[0]
        at += 1


def test_streamed_logprobs_are_the_same_as_the_whole_answers(server: Server) -> None:
    client = server.client()
    whole = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, temperature=0, seed=0,
                                           logprobs=True, top_logprobs=2)
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, temperature=0, seed=0,
                                                logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content or []
    assert whole.choices[0].logprobs is not None
    expected = whole.choices[0].logprobs.content or []
    assert [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in expected]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in expected], abs=1e-4)


def test_under_a_schema_the_logprobs_are_over_what_the_grammar_allows(server: Server) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    completion = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is the sky blue? Answer as JSON."}], temperature=0, seed=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}},
        logprobs=True, top_logprobs=20)
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content
    assert choice.message.content in ('{"answer":"yes"}', '{"answer":"no"}')
    # Where the grammar leaves one token, it has probability 1; where it chooses yes or no, the choices it
    # allows are all there is (their probabilities sum to 1), and every one starts one of the two values.
    choosing = [e for e in entries if e.logprob != 0.0]
    assert len(choosing) == 1
    [choice_entry] = choosing
    allowed = [t.token for t in choice_entry.top_logprobs]
    assert allowed and all("yes".startswith(t) or "no".startswith(t) for t in allowed)
    assert sum(math.exp(t.logprob) for t in choice_entry.top_logprobs) == pytest.approx(1.0, abs=1e-4)
    assert choice_entry.top_logprobs[0].token == choice_entry.token  # greedy: the likeliest allowed token


def test_top_logprobs_without_logprobs_or_past_20_is_a_400(server: Server) -> None:
    client = server.client()
    for extra, param in (({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21},
                                                                   "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, **extra)  # type: ignore[arg-type]
        assert isinstance(err.value.body, dict) and err.value.body["param"] == param


def test_logprobs_asked_of_the_responses_api_are_a_400_not_an_empty_list(server: Server) -> None:
    client = server.client()
    for extra, param in (({"include": ["message.output_text.logprobs"]}, "include"), ({"top_logprobs": 2},
                                                                                     "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, **extra)  # type: ignore[arg-type]
        assert isinstance(err.value.body, dict)
        assert (err.value.body["param"], err.value.body["message"]) == (
            param, "logprobs are not available on the Responses API yet; Chat Completions (logprobs, top_logprobs) "
                   "and /v1/completions have them")
