"""Replica choice for the vLLM engine (no server needed): least outstanding requests, failures left out a while."""

from __future__ import annotations

import pytest

from smolrun.backends import vllm
from smolrun.backends.vllm import Replicas
from smolrun.errors import EngineUnavailable


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(vllm.time, "monotonic", lambda: now[0])
    return now


def test_least_outstanding_then_round_the_list() -> None:
    replicas = Replicas(["http://a:8000/v1", "http://b:8000/", "http://c:8000"])
    assert [r.url for r in replicas.all] == ["http://a:8000", "http://b:8000", "http://c:8000"]
    picked = []
    for _ in range(3):
        replica = replicas.pick()
        replica.outstanding += 1
        picked.append(replica.url)
    assert sorted(picked) == ["http://a:8000", "http://b:8000", "http://c:8000"]  # one each while equal
    replicas.all[1].outstanding = 0
    assert replicas.pick().url == "http://b:8000"


def test_a_failed_replica_is_left_out_then_tried_again_with_backoff(clock: list[float]) -> None:
    replicas = Replicas(["http://a", "http://b"], retry_s=5.0)
    a, b = replicas.all
    replicas.failed(a, "ConnectError")
    assert {replicas.pick().url for _ in range(4)} == {"http://b"}
    clock[0] += 5.0
    assert {replicas.pick().url for _ in range(4)} == {"http://a", "http://b"}
    replicas.failed(a, "ConnectError")  # a second failure in a row: twice as long
    clock[0] += 5.0
    assert {replicas.pick().url for _ in range(4)} == {"http://b"}
    clock[0] += 5.0
    assert "http://a" in {replicas.pick().url for _ in range(4)}
    replicas.answered(a)
    assert (a.failures, a.reason) == (0, "")
    for _ in range(10):
        replicas.failed(b, "x")
    assert b.down_until - clock[0] == 60.0  # at most a minute


def test_all_down_is_engine_unavailable_naming_each(clock: list[float]) -> None:
    replicas = Replicas(["http://a", "http://b"])
    replicas.failed(replicas.all[0], "ConnectError: refused")
    replicas.failed(replicas.all[1], "HTTP 503: overloaded")
    with pytest.raises(EngineUnavailable) as caught:
        replicas.pick()
    assert caught.value.status == 503
    assert caught.value.message == ("no vLLM server answers (http://a: ConnectError: refused; http://b: HTTP 503: "
                                    "overloaded); the first is tried again in 5 s")


def test_no_url_is_refused() -> None:
    with pytest.raises(ValueError):
        Replicas([])


def test_replicas_up_leaves_out_those_failed_until_their_retry(clock: list[float]) -> None:
    replicas = Replicas(["http://a", "http://b"], retry_s=5.0)
    assert replicas.up() == 2
    replicas.failed(replicas.all[0], "ConnectError")
    assert replicas.up() == 1
    clock[0] += 5.0
    assert replicas.up() == 2  # tried again from now on
