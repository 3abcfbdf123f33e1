"""`smolrun chat`: the REPL's logic with a scripted talker, then a real terminal session against a real server."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from smolrun.engine import Engine
from smolrun.errors import InvalidRequest
from smolrun.repl import Conversation, Repl
from tests.conftest import Server
from tests.fakes import TurnsModel


class Scripted:
    """Answers each turn with the next script, as (kind, piece) pairs; records what it was sent."""

    name = "scripted"

    def __init__(self, *answers: list[tuple[str, str]] | BaseException) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[list[dict[str, Any]], dict[str, Any] | None]] = []
        self.closed = 0

    def stream(self, messages: list[dict[str, Any]], response_format: dict[str, Any] | None,
               options: dict[str, Any]) -> Iterator[tuple[str, str]]:
        self.sent.append((messages, response_format))
        answer = self.answers.pop(0)
        try:
            if isinstance(answer, BaseException):
                yield "text", "Par"
                raise answer
            yield from answer
        finally:
            self.closed += 1


def session(talker: Scripted, lines: Sequence[str], system: str | None = None) -> tuple[str, str]:
    feed = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    out, err = io.StringIO(), io.StringIO()
    Repl(talker, Conversation(system), {"max_tokens": 10}, read=read, out=out, err=err).run()
    return out.getvalue(), err.getvalue()


def test_turns_keep_history_and_reset_keeps_the_system_message() -> None:
    talker = Scripted([("text", "Hi "), ("text", "Ada."), ("finish", "stop")], [("text", "Ada"), ("finish", "stop")],
                      [("text", "Who?"), ("finish", "stop")])
    out, _ = session(talker, ["I am Ada.", "Who am I?", "/reset", "Who am I?"], system="Be brief.")
    assert out == "Hi Ada.\nAda\nWho?\n"
    system = {"role": "system", "content": "Be brief."}
    assert talker.sent[1][0] == [system, {"role": "user", "content": "I am Ada."},
                                 {"role": "assistant", "content": "Hi Ada."}, {"role": "user", "content": "Who am I?"}]
    assert talker.sent[2][0] == [system, {"role": "user", "content": "Who am I?"}]


def test_ctrl_c_stops_the_answer_keeps_what_was_said_and_the_repl_goes_on() -> None:
    talker = Scripted(KeyboardInterrupt(), [("text", "ok"), ("finish", "stop")])
    out, err = session(talker, ["Capital of France?", "Again?"])
    assert out == "Par\nok\n"
    assert "(stopped)" in err
    assert talker.closed == 2  # the stopped stream was closed: its generation is cancelled
    assert talker.sent[1][0][1] == {"role": "assistant", "content": "Par"}


def test_schema_and_file_commands_shape_the_next_request(tmp_path: Path) -> None:
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"name": {"type": "string"}}}))
    notes = tmp_path / "notes.txt"
    notes.write_text("Lyon is in France.")
    talker = Scripted([("text", "{}"), ("finish", "stop")], [("text", "x"), ("finish", "length")])
    _, err = session(talker, [f"/schema {schema}", f"/file {notes}", "Which city?", "/schema off", "More."])
    messages, fmt = talker.sent[0]
    assert fmt == {"type": "json_schema", "json_schema": {"name": "city", "schema": {
        "type": "object", "properties": {"name": {"type": "string"}}}}}
    assert messages[-1] == {"role": "user", "content": [
        {"type": "text", "text": "File notes.txt:\n```\nLyon is in France.\n```"},
        {"type": "text", "text": "Which city?"}]}
    assert talker.sent[1][1] is None and talker.sent[1][0][-1] == {"role": "user", "content": "More."}
    assert "(cut at the token limit: --max-tokens)" in err


def test_bad_commands_and_server_errors_are_one_line_and_lose_nothing(tmp_path: Path) -> None:
    talker = Scripted(InvalidRequest("the server answered 400: bad schema"), [("text", "fine"), ("finish", "stop")])
    out, err = session(talker, [f"/schema {tmp_path / 'none.json'}", "/file /no/such/file", "/frobnicate",
                                "First?", "Second?"])
    assert f"smolrun: error: cannot read schema file {tmp_path / 'none.json'}: No such file or directory" in err
    assert "smolrun: error: no file at /no/such/file" in err
    assert "unknown command '/frobnicate'" in err
    assert "smolrun: error: the server answered 400: bad schema" in err
    assert talker.sent[1][0] == [{"role": "user", "content": "Second?"}]  # the failed turn is not history
    assert out == "Par\nfine\n"


def test_thinking_is_folded_and_shown_on_request() -> None:
    talker = Scripted([("reasoning", "The user greets. "), ("reasoning", "Greet back."), ("text", "Hello!"),
                       ("finish", "stop")])
    out, err = session(talker, ["Hi", "/thoughts"])
    assert out == "Hello!\n"
    assert "[thought 5 words: /thoughts shows them]" in err
    assert err.rstrip().endswith("The user greets. Greet back.")


class SlowTurnsModel(TurnsModel):
    """A scripted model that takes its time per token, so that a person (here pexpect) can stop it."""

    def extend(self, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        import time

        time.sleep(0.005)  # the fake model's pace, not a wait on a result
        return super().extend(tokens)


def test_a_terminal_session_against_a_server(make_server: Any) -> None:
    pexpect = pytest.importorskip("pexpect", reason="the terminal test drives a pty with pexpect: `make test` "
                                                    "installs it")
    model = SlowTurnsModel(b"Hello Ada.", b"Your name is Ada.", b"Who are you? " * 400, b"Fresh start.")
    server: Server = make_server(Engine(model))
    child = pexpect.spawn(sys.executable, ["-m", "smolrun", "chat", "--url", server.url.removesuffix("/v1"),
                                           "--max-tokens", "6000"], encoding="utf-8", timeout=60,
                          env={**os.environ, "NO_COLOR": "1"})
    try:
        child.expect(">>> ")
        child.sendline("I am Ada.")
        child.expect("Hello Ada.")
        child.expect(">>> ")
        child.sendline("Who am I?")
        child.expect("Your name is Ada.")
        child.expect(">>> ")
        child.sendline("Talk for long.")
        child.expect("Who are you?")
        child.sendintr()  # Ctrl+C in the middle of the answer
        child.expect(r"\(stopped\)")
        child.expect(">>> ")
        child.sendline("/reset")
        child.expect(r"\(the conversation starts over\)")
        child.sendline("Hello again.")
        child.expect("Fresh start.")
        child.expect(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "I am Ada." in model.prompts[1] and "Hello Ada." in model.prompts[1]  # the second turn saw the first
    assert "I am Ada." not in model.prompts[3] and "Hello again." in model.prompts[3]  # after /reset


@pytest.mark.model
def test_a_terminal_session_on_the_bundled_model() -> None:
    pexpect = pytest.importorskip("pexpect", reason="the terminal test drives a pty with pexpect: `make test` "
                                                    "installs it")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make setup`")
    child = pexpect.spawn(sys.executable, ["-m", "smolrun", "chat", "--temperature", "0", "--max-tokens", "2000"],
                          encoding="utf-8", timeout=120)
    try:
        child.expect(">>> ")
        child.sendline("Write a very long story about a dragon.")
        child.expect(r"\w+ \w+ \w+")  # the answer is being written
        child.sendintr()
        child.expect(r"\(stopped\)")
        child.expect(">>> ")
        child.sendline("/reset")
        child.expect(r"\(the conversation starts over\)")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
