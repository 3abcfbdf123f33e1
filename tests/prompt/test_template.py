import pytest

from smolrun.errors import InvalidRequest
from smolrun.prompt import CHATML, render
from smolrun.turn import Message

MESSAGES = (Message("system", "Be brief."), Message("user", "Hi"))


def test_chatml_fallback() -> None:
    assert render(None, MESSAGES) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(CHATML, MESSAGES, add_generation_prompt=False).endswith("Hi<|im_end|>\n")


def test_template_helpers_exist() -> None:
    tpl = "{{ bos_token }}{{ messages | tojson }}{% if strftime_now('%Y') | int > 2000 %}ok{% endif %}"
    assert render(tpl, MESSAGES, bos_token="<s>") == (
        '<s>[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]ok'
    )


def test_raise_exception_becomes_a_400() -> None:
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        render("{{ raise_exception('roles must alternate') }}", MESSAGES)


def test_the_template_runs_sandboxed() -> None:
    with pytest.raises(InvalidRequest, match="chat template"):
        render("{{ ''.__class__.__mro__[1].__subclasses__() }}", MESSAGES)
