"""The vLLM engine against a real vLLM server (its CPU build here), launched once by smolrun's own code on the
bundled model converted to safetensors: both APIs through it, cancellation, replicas, the replay check."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest
from pydantic import BaseModel

from smolrun.backends import vllm as vllm_backend
from smolrun.backends.vllm import Replicas, VllmModel
from smolrun.backends.vllm_server import DEFAULT_VLLM_PYTHON
from smolrun.config import Settings
from smolrun.engine import Engine
from smolrun.errors import EngineUnavailable, GenerationFailed, InvalidRequest, QueueFull
from smolrun.turn import Image, Message, Reasoning, ResponseFormat, SamplingParams, Turn
from tests.api.test_files_containers import needs_sandbox
from tests.conftest import Server, _free_port, make_tiny_smollm3, serve

VLLM_PYTHON = os.environ.get("SMOLRUN_VLLM_PYTHON", DEFAULT_VLLM_PYTHON)
if not Path(VLLM_PYTHON).exists():
    pytest.skip(f"vLLM is not installed at {VLLM_PYTHON} (`make vllm` installs it; `make test` does too)",
                allow_module_level=True)
pytest.importorskip("transformers",
                    reason="converting the bundled model for vLLM needs transformers: `make test` installs it")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """One vLLM server for the module, launched and checked by Engine.load (the launch path itself)."""
    data = tmp_path_factory.mktemp("vllm-data")
    engine = Engine.load(Settings(backend="vllm", model="smollm2-135m", n_ctx=2048, data_dir=data,
                                  vllm_python=VLLM_PYTHON))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def api(vllm: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve(vllm, Settings(backend="vllm", port=_free_port(), data_dir=tmp_path_factory.mktemp("data"),
                                    warm_containers=0))


def person_turn(max_tokens: int = 40) -> Turn:
    return Turn((Message("user", "Give me a person."),), ResponseFormat("json_schema", PERSON),
                SamplingParams(max_tokens=max_tokens, temperature=0))


def test_the_launched_server_is_checked_and_answers_in_the_grammar(vllm: Engine) -> None:
    model = vllm.model
    assert isinstance(model, VllmModel) and model.served == "smollm2-135m" and model.n_ctx == 2048
    events = list(vllm.generate(vllm.prepare(person_turn())))
    text = "".join(e.text for e in events[:-1])  # type: ignore[union-attr]
    jsonschema.validate(json.loads(text), PERSON)
    done = events[-1]
    tokens = [t for e in events[:-1] for t in e.tokens]  # type: ignore[union-attr]
    assert done.finish_reason == "stop" and done.stats.completion_tokens == len(tokens)  # type: ignore[union-attr]
    assert done.stats.prompt_tokens == len(vllm.prepare(person_turn()).prompt)  # type: ignore[union-attr]


class Person(BaseModel):
    name: str
    age: int


def test_chat_parse_and_sdk_stream_helpers(api: Server) -> None:
    client = api.client()
    messages = [{"role": "user", "content": "Give me a person."}]
    parsed = client.chat.completions.parse(model="smollm2-135m", messages=messages, response_format=Person,  # type: ignore[arg-type]
                                           temperature=0, max_tokens=40)
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and parsed.choices[0].finish_reason == "stop"
    assert parsed.usage is not None and parsed.usage.completion_tokens > 0
    with client.chat.completions.stream(model="smollm2-135m", messages=messages, response_format=Person,  # type: ignore[arg-type]
                                        temperature=0, max_tokens=40) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    assert kinds[-1] == "content.done" and final.choices[0].message.parsed == person  # greedy: the same person


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "strict": True, "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_strict_tools(api: Server, choice: object) -> None:
    reply = api.client().chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER], tool_choice=choice, parallel_tool_calls=False, temperature=0, max_tokens=40)  # type: ignore[arg-type]
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.tool_calls is not None
    call = message.tool_calls[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[union-attr, index]


class Answer(BaseModel):
    answer: int


@needs_sandbox
def test_responses_with_the_code_interpreter_and_a_strict_format(api: Server) -> None:
    parsed = api.client().responses.parse(
        model="smollm2-135m", input="What is 6 * 7? Use Python.", text_format=Answer, temperature=0,
        tools=[{"type": "code_interpreter", "container": {"type": "auto"}}], max_tool_calls=1,
        max_output_tokens=200)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Answer)
    assert parsed.output[-1].type == "message"


def _running(url: str) -> float:
    """Requests vLLM is decoding, from its Prometheus metrics."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vLLM reports no vllm:num_requests_running")


def test_a_client_that_leaves_aborts_the_upstream_request(api: Server, vllm: Engine) -> None:
    model = vllm.model
    assert isinstance(model, VllmModel)
    url = model.replicas.all[0].url
    stream = api.client().chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Write a long story."}], max_tokens=1500,
        temperature=1.0, stream=True)
    chunks = iter(stream)
    while not next(chunks).choices[0].delta.content:  # the first chunk (the role) may come before any token
        pass
    assert _running(url) == 1.0
    stream.close()
    deadline = time.monotonic() + 30
    while (_running(url), model.replicas.all[0].outstanding) != (0.0, 0):
        assert time.monotonic() < deadline, "vLLM kept decoding for a client that left"
        time.sleep(0.05)


def test_admission_beyond_the_queue_is_queue_full(vllm: Engine) -> None:
    small = Engine(vllm.model, max_queue=0, max_inflight=1)
    try:
        first = small.generate(small.prepare(person_turn()))
        with pytest.raises(QueueFull):
            small.generate(small.prepare(person_turn()))
        assert list(first)[-1].finish_reason == "stop"  # type: ignore[union-attr]
    finally:
        small.close()


def test_pictures_are_a_400_that_names_the_limitation(vllm: Engine) -> None:
    turn = Turn((Message.of("user", [Image(b"\x89PNG..."), "What is this?"]),))
    with pytest.raises(InvalidRequest, match="the vLLM engine takes no pictures"):
        vllm.prepare(turn)


def test_a_token_the_grammar_rejects_is_an_error_not_an_answer(api: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    real = vllm_backend.completion_body

    def other_grammar(*args, **kwargs):  # type: ignore[no-untyped-def]
        body = real(*args, **kwargs)
        body["structured_outputs"] = {"grammar": 'start: "[1, 2]"\n'}  # vLLM enforces this, the local matcher not
        return body

    monkeypatch.setattr("smolrun.backends.vllm.completion_body", other_grammar)
    client = api.client()
    with pytest.raises(Exception) as caught:
        client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "A person?"}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "person", "schema": PERSON, "strict": True}},
                                       temperature=0, max_tokens=20)
    error = caught.value
    assert getattr(error, "status_code", None) == 500
    assert "which the grammar does not allow there" in str(error)


class Proxy:
    """A TCP relay to a vLLM server: a replica that can be killed (its connections reset, its port closed)."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.killed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                if self.killed:
                    client.close()
                    upstream.close()
                    return
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def kill(self) -> None:
        with self.lock:
            self.killed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; close alone would not
        except OSError:
            pass
        self.listener.close()
        for s in self.sockets:  # shutdown first: close alone would leave the relaying threads blocked
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_two_replicas_with_one_killed_midway(vllm: Engine) -> None:
    model = vllm.model
    assert isinstance(model, VllmModel)
    a, b = Proxy(model.replicas.all[0].url), Proxy(model.replicas.all[0].url)
    replicas = Replicas([a.url, b.url])
    two = Engine(VllmModel(model.text, model.name, model.served, model.n_ctx, replicas), max_inflight=8)
    prepared = two.prepare(person_turn())

    async def answers(n: int, kill: Proxy | None = None) -> list[str | BaseException]:
        streams = [two.stream(prepared) for _ in range(n)]
        firsts = [await anext(s) for s in streams]  # every request is decoding
        if kill is not None:
            kill.kill()

        async def rest(first: object, stream: object) -> str:
            return getattr(first, "text", "") + "".join([getattr(e, "text", "") async for e in stream])  # type: ignore[attr-defined]

        return await asyncio.gather(*(rest(f, s) for f, s in zip(firsts, streams, strict=True)),
                                    return_exceptions=True)

    try:
        before = asyncio.run(answers(4))
        assert len(set(before)) == 1 and json.loads(str(before[0])).keys() == {"name", "age"}  # greedy: the same
        assert [r.outstanding for r in replicas.all] == [0, 0]
        during = asyncio.run(answers(4, kill=a))  # two on each replica; a dies while they decode
        failed = [r for r in during if isinstance(r, BaseException)]
        assert len(failed) == 2 and all(isinstance(f, GenerationFailed) and "stopped answering" in f.message
                                        for f in failed)
        assert [r for r in during if isinstance(r, str)] == before[:2]
        assert asyncio.run(answers(4)) == before  # later requests all go to the replica still up
        assert replicas.all[0].failures >= 1 and replicas.all[1].failures == 0
        b.kill()
        with pytest.raises(EngineUnavailable, match="no vLLM server answers"):
            asyncio.run(answers(1))
    finally:
        two.close()
        a.kill()
        b.kill()


@pytest.fixture(scope="module")
def tiny_smollm3_on_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """vLLM serves a tiny random SmolLM3 (through its Transformers modelling backend) as well; its CPU attention
    wants heads of 32 dimensions or more."""
    tiny = make_tiny_smollm3(tmp_path_factory.mktemp("tiny-smollm3-vllm"), hidden=128, heads=2, kv_heads=1)
    engine = Engine.load(Settings(backend="vllm", model=str(tiny), n_ctx=2048,
                                  data_dir=tmp_path_factory.mktemp("vllm-tiny"), vllm_python=VLLM_PYTHON))
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("budget", [8, 30])
def test_a_thinking_budget_holds_on_vllm_then_the_answer_validates(tiny_smollm3_on_vllm: Engine,
                                                                   budget: int) -> None:
    from tests.backends.test_transformers import ASK, SCHEMA, run

    turn = Turn(ASK, ResponseFormat("json_schema", SCHEMA), SamplingParams(max_tokens=150, seed=1),
                reasoning=Reasoning("low", budget=budget))
    thought, answer, done = run(tiny_smollm3_on_vllm, turn)
    assert done.finish_reason == "stop" and thought
    assert 0 < done.stats.reasoning_tokens <= budget
    jsonschema.validate(json.loads(answer), SCHEMA)
