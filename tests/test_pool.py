"""The model pool: models loaded on demand, least recently used idle ones unloaded past the limits, leases that
keep a model in memory while a request uses it. Unit tests load byte-level fakes through a scripted loader;
the server test loads the bundled GGUF and a tiny SmolVLM GGUF through one server."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from smolrun.cli import main
from smolrun.config import Settings
from smolrun.engine import Engine
from smolrun.errors import InvalidRequest, ModelNotFound, ModelUnavailable, QueueFull
from smolrun.pool import ModelPool, Servable
from tests.fakes import ByteModel

DEADLINE_STEPS = 2000  # event-loop turns a test waits for a state before it fails (no fixed sleeps)


class Loader:
    """Loads a fresh byte-level engine per call, named after the model; when `gated`, every load waits until
    `gate` opens; the first `fail` loads raise."""

    def __init__(self, sees: frozenset[str] = frozenset(), gated: bool = False, fail: int = 0) -> None:
        self.loaded: list[str] = []
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.fail = fail
        self.sees = sees

    def __call__(self, model: Servable) -> Engine:
        assert self.gate.wait(30), "the test never opened the gate"
        if self.fail:
            self.fail -= 1
            raise ModelUnavailable(f"cannot load {model.name}")
        self.loaded.append(model.name)
        return engine_named(model.name, sees=model.name in self.sees)


def engine_named(name: str, sees: bool = False, memory: int | None = None) -> Engine:
    fake = ByteModel()
    fake.name = name  # type: ignore[misc]
    if sees:
        fake.vision = object()  # type: ignore[assignment]  # the pool asks only whether there is one
    if memory is not None:
        fake.memory_bytes = memory  # type: ignore[attr-defined]
    return Engine(fake)


def pool_of(*names: str, loaded: int = 1, loader: Loader | None = None, **limits: Any) -> ModelPool:
    """A pool of `names`, the first `loaded` of them loaded; the first is the default model."""
    models = []
    for i, name in enumerate(names):
        model = Servable(name, f"/models/{name}.gguf", sees=name.startswith("vision"))
        if i < loaded:
            model.hold(engine_named(name, sees=model.sees is True))
        models.append(model)
    return ModelPool(models, loader or Loader(frozenset(n for n in names if n.startswith("vision"))),
                     default=models[0], **limits)


def loaded(pool: ModelPool) -> list[str]:
    return [m.name for m in pool.models if m.engine is not None]


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(DEADLINE_STEPS):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the pool never reached the state the test waits for")


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


def test_a_named_model_loads_on_first_use_and_the_least_recently_used_idle_one_goes() -> None:
    async def test() -> None:
        pool = pool_of("a", "b", "c", max_loaded=2)
        engine, release = await pool.acquire("b")
        assert (engine.name, loaded(pool), pool.loads) == ("b", ["a", "b"], 1)
        release()
        _, release = await pool.acquire("/models/a.gguf")  # named by what it loads from: the same model
        release()
        b = pool.models[1].engine
        assert b is not None
        engine, release = await pool.acquire("c")  # b was used before a: b goes
        release()
        assert (engine.name, loaded(pool), pool.loads, pool.unloads) == ("c", ["a", "c"], 2, 1)
        assert b._prepare_pool._shutdown  # the unloaded engine was shut down, not merely dropped

    run(test)


def test_a_model_in_use_is_never_unloaded_the_load_waits_until_it_is_free() -> None:
    async def test() -> None:
        pool = pool_of("a", "b", max_loaded=1)
        _, release_a = await pool.acquire("a")
        waiting = asyncio.ensure_future(pool.acquire("b"))
        await until(lambda: pool._waiting == 1)
        for _ in range(20):  # it stays waiting while a is held
            await asyncio.sleep(0)
        assert (loaded(pool), pool.loads, waiting.done()) == (["a"], 0, False)
        release_a()
        engine, release_b = await waiting
        release_b()
        assert (engine.name, loaded(pool), pool.unloads) == ("b", ["b"], 1)

    run(test)


def test_requests_for_a_model_that_is_loading_share_its_one_load() -> None:
    async def test() -> None:
        loader = Loader(gated=True)
        pool = pool_of("a", "b", loader=loader)
        tasks = [asyncio.ensure_future(pool.acquire("b")) for _ in range(3)]
        await until(lambda: pool._waiting == 3)
        loader.gate.set()
        leases = await asyncio.gather(*tasks)
        assert loader.loaded == ["b"]
        assert len({id(engine) for engine, _ in leases}) == 1
        assert pool.models[1].users == 3
        for _, release in leases:
            release()
            release()  # a second release changes nothing
        assert pool.models[1].users == 0

    run(test)


def test_a_failed_load_is_every_waiters_error_and_the_next_request_tries_again() -> None:
    async def test() -> None:
        loader = Loader(fail=1)
        pool = pool_of("a", "b", loader=loader)
        results = await asyncio.gather(pool.acquire("b"), pool.acquire("b"), return_exceptions=True)
        assert [type(r) for r in results] == [ModelUnavailable, ModelUnavailable]
        assert (pool.models[1].users, loaded(pool), pool._waiting) == (0, ["a"], 0)
        engine, release = await pool.acquire("b")
        release()
        assert (engine.name, loader.loaded) == ("b", ["b"])

    run(test)


def test_past_the_queue_limit_a_request_for_a_loading_model_is_429() -> None:
    async def test() -> None:
        loader = Loader(gated=True)
        pool = pool_of("a", "b", loader=loader, max_waiting=1)
        first = asyncio.ensure_future(pool.acquire("b"))
        await until(lambda: pool._waiting == 1)
        with pytest.raises(QueueFull):
            await pool.acquire("b")
        engine, release = await pool.acquire("a")  # a loaded model answers at once, queue or not
        release()
        loader.gate.set()
        _, release = await first
        release()
        assert pool.models[1].users == 0

    run(test)


def test_a_request_that_leaves_while_its_model_loads_lets_go_and_the_load_finishes() -> None:
    async def test() -> None:
        loader = Loader(gated=True)
        pool = pool_of("a", "b", loader=loader)
        leaving = asyncio.ensure_future(pool.acquire("b"))
        await until(lambda: pool._waiting == 1)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert (pool.models[1].users, pool._waiting) == (0, 0)
        loader.gate.set()
        await until(lambda: pool.models[1].engine is not None)
        assert loader.loaded == ["b"]

    run(test)


def test_auto_sends_pictures_to_a_model_that_sees_loading_it_and_text_to_the_default() -> None:
    async def test() -> None:
        pool = pool_of("a", "vision-v", max_loaded=1)
        engine, release = await pool.acquire("auto", pictures=True)
        release()
        assert (engine.name, loaded(pool)) == ("vision-v", ["vision-v"])
        engine, release = await pool.acquire("auto", pictures=False)
        release()
        assert (engine.name, loaded(pool)) == ("a", ["a"])
        with pytest.raises(InvalidRequest, match="'a' cannot see images; models on this server that can: "
                                                 "'vision-v'"):
            await pool.acquire("a", pictures=True)
        assert pool.models[0].users == 0

    run(test)


def test_a_model_whose_eyes_are_unknown_is_refused_pictures_once_loaded_shows_it_blind() -> None:
    async def test() -> None:
        pool = pool_of("a", "b")
        pool.models[1].sees = None  # known only once loaded
        with pytest.raises(InvalidRequest, match="'b' cannot see images"):
            await pool.acquire("b", pictures=True)
        assert (loaded(pool), pool.models[1].sees, pool.models[1].users) == (["a", "b"], False, 0)

    run(test)


def test_the_memory_limit_unloads_beside_the_count() -> None:
    async def test() -> None:
        loader = Loader()
        pool = pool_of("a", "b", "c", loader=loader, max_loaded=3, max_bytes=250)
        pool.models[0].memory = 100
        pool.models[1].memory, pool.models[2].memory = 120, 140  # their files' size, until they load
        _, release = await pool.acquire("b")  # 100 + 120 fit
        release()
        _, release = await pool.acquire("c")  # 220 + 140 do not: a goes (120 + 140 do not either: b too)
        release()
        assert (loaded(pool), pool.unloads) == (["c"], 2)

    run(test)


def test_a_model_too_big_for_the_memory_limit_still_loads_alone() -> None:
    async def test() -> None:
        pool = pool_of("a", "b", max_bytes=10)
        pool.models[1].memory = 50
        engine, release = await pool.acquire("b")
        release()
        assert (engine.name, loaded(pool)) == ("b", ["b"])

    run(test)


def test_an_unknown_model_is_a_404_naming_those_served() -> None:
    pool = pool_of("a", "b")
    with pytest.raises(ModelNotFound, match="'x' does not exist on this server; it serves 'a', 'b'"):
        pool.find("x")


def test_max_loaded_models_below_one_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="at least 1"):
        pool_of("a", max_loaded=0)


def test_models_on_demand_are_for_llama_cpp() -> None:
    with pytest.raises(InvalidRequest, match="--models .* serves GGUF models on llama.cpp"):
        ModelPool.serving(Settings(backend="transformers", models=("x.gguf",)), engine_named("a"))


def test_a_model_to_load_on_demand_must_be_on_this_machine(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no GGUF file at"):
        ModelPool.serving(Settings(models=(str(tmp_path / "missing.gguf"),)), engine_named("a"))


# One server, two real models: the bundled GGUF and a tiny SmolVLM GGUF with its projector.


def ps(url: str) -> dict[str, str]:
    """`smolrun ps`'s LOADED column by model name."""
    result = CliRunner().invoke(main, ["ps", "--url", url.removesuffix("/v1")])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()[1:]]
    return {row[0]: row[1] for row in rows}


@pytest.fixture()
def two_models(make_server, tiny_smolvlm_gguf: Path):  # type: ignore[no-untyped-def]
    # Its own bundled engine: the server unloads it, and other tests share the session's.
    text = Engine.load(Settings(threads=2, n_ctx=2048))
    return make_server(text, models=(str(tiny_smolvlm_gguf),), max_loaded_models=1, threads=2, n_ctx=2048)


def chat(url: str, model: str, content: Any = "Say hi.") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0}
    return httpx.post(f"{url}/chat/completions", json=body, timeout=120)


def test_one_server_answers_with_two_models_loading_each_on_demand_and_unloading_the_other(two_models) -> None:  # type: ignore[no-untyped-def]
    url = two_models.url
    assert ps(url) == {"smollm2-135m": "yes", "tiny-smolvlm.gguf": "no"}
    cards = {c["id"]: c for c in httpx.get(f"{url}/models").json()["data"]}
    assert cards["tiny-smolvlm.gguf"]["capabilities"] == {"vision": True, "reasoning": None}
    assert cards["tiny-smolvlm.gguf"]["memory_bytes"] is None
    reply = chat(url, "tiny-smolvlm.gguf")
    assert (reply.status_code, reply.json()["model"]) == (200, "tiny-smolvlm.gguf")
    assert ps(url) == {"smollm2-135m": "no", "tiny-smolvlm.gguf": "yes"}
    reply = chat(url, "smollm2-135m")
    assert (reply.status_code, reply.json()["model"]) == (200, "smollm2-135m")
    assert ps(url) == {"smollm2-135m": "yes", "tiny-smolvlm.gguf": "no"}
    metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
    assert 'smolrun_model_loaded{model="smollm2-135m"} 1.0' in metrics
    assert 'smolrun_model_loaded{model="tiny-smolvlm.gguf"} 0.0' in metrics


def test_concurrent_requests_for_both_models_all_succeed(two_models) -> None:  # type: ignore[no-untyped-def]
    names = ["smollm2-135m", "tiny-smolvlm.gguf"] * 3
    with ThreadPoolExecutor(len(names)) as threads:
        replies = list(threads.map(lambda name: chat(two_models.url, name), names))
    assert [(r.status_code, r.json()["model"]) for r in replies] == [(200, n) for n in names]


def test_auto_routes_a_picture_to_the_vision_model_loaded_on_demand(two_models) -> None:  # type: ignore[no-untyped-def]
    from tests.test_media import data_url, picture

    content = [{"type": "text", "text": "What is it?"},
               {"type": "image_url", "image_url": {"url": data_url(picture((80, 60)))}}]
    reply = chat(two_models.url, "auto", content)
    assert (reply.status_code, reply.json()["model"]) == (200, "tiny-smolvlm.gguf")
    reply = chat(two_models.url, "smollm2-135m", content)
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == ("The model 'smollm2-135m' cannot see images; models on this server "
                                                "that can: 'tiny-smolvlm.gguf' (or 'auto')")
