"""The legacy Completions API on the real bundled model through the official openai SDK: the prompt continued
as it is (no chat template), checked against a direct greedy decode of the same tokens."""

from __future__ import annotations

import json
import math

import numpy as np
import openai
import pytest

from smolrun.backends.base import Feed
from smolrun.backends.llama_cpp import LlamaCppModel
from tests.conftest import Server, bundled_gguf

pytestmark = pytest.mark.model
MODEL = "smollm2-135m"
PROMPT = "The three primary colors are"


def direct(prompt: str, steps: int, top: int = 3) -> list[tuple[bytes, float, list[tuple[bytes, float]]]]:
    """Greedy steps on a model of our own: each token's bytes, logprob, and the `top` likeliest there."""
    model = LlamaCppModel(bundled_gguf(), name="direct", n_ctx=512, n_threads=2, n_seq=1)
    tokens = model.tokenize(prompt)
    logits = model.decode([Feed(0, 0, tokens, True)])[0]
    at, out = len(tokens), []
    for _ in range(steps):
        scores = logits.astype(np.float64)
        scores -= scores.max() + math.log(np.exp(scores - scores.max()).sum())
        best = [int(t) for t in np.argsort(-scores, kind="stable")[:top]]
        out.append((model.token_bytes(best[0]), float(scores[best[0]]),
                    [(model.token_bytes(t), float(scores[t])) for t in best]))
        logits = model.decode([Feed(0, at, [best[0]], True)])[0]
        at += 1
    return out


def test_a_prompt_is_continued_as_it_is_with_the_models_own_logprobs(server: Server) -> None:
    completion = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, seed=0,
                                                    logprobs=3)
    [choice] = completion.choices
    assert completion.object == "text_completion" and choice.index == 0 and choice.finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    expected = direct(PROMPT, 8)
    assert choice.text == b"".join(b for b, _, _ in expected).decode()  # no chat template around the prompt
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.tokens == [b.decode() for b, _, _ in expected]
    assert lp.token_logprobs == pytest.approx([v for _, v, _ in expected], abs=1e-3)
    for top, (_, _, best) in zip(lp.top_logprobs, expected, strict=True):
        assert list(top) == [b.decode() for b, _ in best]
        assert list(top.values()) == pytest.approx([v for _, v in best], abs=1e-3)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]


def test_echo_with_logprobs_scores_the_prompt_itself(server: Server) -> None:
    # The raw JSON: the first prompt token's logprob is null, as at OpenAI and vLLM, which the SDK's strict
    # types (a list of floats) do not allow.
    raw = server.client().completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                                               temperature=0, seed=0, echo=True, logprobs=2)
    [choice] = raw.http_response.json()["choices"]
    lp = choice["logprobs"]
    ids = server.engine.model.tokenize(PROMPT)
    assert choice["text"].startswith(PROMPT) and len(lp["tokens"]) == len(ids) + 2
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    model = LlamaCppModel(bundled_gguf(), name="direct", n_ctx=512, n_threads=2, n_seq=1)
    rows = model.decode([Feed(0, 0, ids, True, every=True)])[0].astype(np.float64)
    for at in range(1, len(ids)):  # each prompt token under the logits after the tokens before it
        row = rows[at - 1] - (rows[at - 1].max() + math.log(np.exp(rows[at - 1] - rows[at - 1].max()).sum()))
        assert lp["token_logprobs"][at] == pytest.approx(row[ids[at]], abs=1e-3)
        best = [int(t) for t in np.argsort(-row, kind="stable")[:2]]
        assert list(lp["top_logprobs"][at]) == [model.token_bytes(t).decode() for t in best]


def test_token_ids_echo_several_prompts_and_n(server: Server) -> None:
    client = server.client()
    ids = server.engine.model.tokenize(PROMPT)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, seed=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, seed=0, echo=True)
    assert by_ids.choices[0].text == PROMPT + by_text.choices[0].text

    several = client.completions.create(model=MODEL, prompt=[PROMPT, "Once upon a time"], n=2, max_tokens=6,
                                        temperature=0, seed=0)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    texts = [c.text for c in several.choices]
    # Greedy samples of one prompt agree (decoded side by side, a batch's passes may differ from a lone pass's in
    # the last bits, so the texts are compared within the request).
    assert texts[0] == texts[1] and texts[2] == texts[3] != texts[0]
    assert several.usage is not None and several.usage.completion_tokens == 24


def test_streamed_choices_come_with_their_index_and_match_the_whole_answer(server: Server) -> None:
    # Without strict validation: a streamed chunk's finish_reason is null until its choice ends, as at OpenAI,
    # which the SDK's Completion type (a required Literal) does not allow.
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    server.clients.append(client)
    whole = server.client().completions.create(model=MODEL, prompt=[PROMPT, "Once upon a time"], max_tokens=6,
                                      temperature=0, seed=0, logprobs=1)
    texts, tokens, finishes, usage = ["", ""], [[], []], {}, None  # type: ignore[var-annotated]
    for chunk in client.completions.create(model=MODEL, prompt=[PROMPT, "Once upon a time"], max_tokens=6,
                                           temperature=0, seed=0, logprobs=1, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.logprobs is not None and c.logprobs.tokens:
                tokens[c.index] += c.logprobs.tokens
            if c.finish_reason is not None:
                finishes[c.index] = c.finish_reason
    assert texts == [c.text for c in whole.choices]
    assert tokens == [c.logprobs.tokens for c in whole.choices if c.logprobs is not None]
    assert finishes == {0: "length", 1: "length"}
    assert usage is not None and usage.completion_tokens == 12


def test_a_response_format_holds_as_in_chat(server: Server) -> None:
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
              "additionalProperties": False}
    completion = server.client().completions.create(
        model=MODEL, prompt="A color as JSON: ", max_tokens=20, temperature=0.8, seed=3,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}})
    assert json.loads(completion.choices[0].text)["color"] in ("red", "green", "blue")


@pytest.mark.parametrize(("extra", "param"), [
    ({"echo": True, "logprobs": 1, "stream": True}, "echo"),
    ({"suffix": "x"}, "suffix"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"n": 17}, "n"),
])
def test_bad_completions_are_400s_naming_the_field(server: Server, extra: dict, param: str) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as err:
        server.client().completions.create(**body)
    assert isinstance(err.value.body, dict) and err.value.body["param"] == param
