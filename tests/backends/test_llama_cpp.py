"""The llama.cpp model wrapper on the real bundled model."""

import pytest

from smolrun.engine import Engine
from smolrun.turn import Message, SamplingParams, TextDelta, Turn

pytestmark = pytest.mark.model


def test_vocabulary_and_template_come_from_the_gguf(engine: Engine) -> None:
    model = engine.model
    assert model.n_vocab == 49152 and model.eog_tokens == frozenset({0, 2, 4})
    assert model.chat_template and "<|im_start|>" in model.chat_template
    for text in ['{"name":"Ada","age":36}', "日本語のテキスト", "<|im_start|>user\nhi<|im_end|>"]:
        assert model.lltokenizer.tokenize_str(text, parse_special=True) == model.tokenize(text)


def test_our_greedy_loop_matches_llama_cpp_python(engine: Engine) -> None:
    turn = Turn((Message("user", "What is the capital of France?"),), params=SamplingParams(max_tokens=24,
                                                                                           temperature=0))
    ours = "".join(e.text for e in engine.generate(engine.prepare(turn)) if isinstance(e, TextDelta))
    prompt = engine.render(turn)
    llama = engine.model.llama  # type: ignore[attr-defined]
    theirs = llama.create_completion(prompt, max_tokens=24, temperature=0, top_k=1)["choices"][0]["text"]
    assert ours == theirs


def test_prefix_reuse_does_not_change_greedy_output(engine: Engine) -> None:
    turn = Turn((Message("user", "List two fruits."),), params=SamplingParams(max_tokens=16, temperature=0))
    runs = ["".join(e.text for e in engine.generate(engine.prepare(turn)) if isinstance(e, TextDelta))
            for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]
