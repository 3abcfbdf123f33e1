"""GET /metrics and the per-request log line: exact counts after known requests, on fake models."""

from __future__ import annotations

import logging
import types

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from smolrun.api.metrics import Metrics, Record
from smolrun.backends.vllm import Replicas, VllmModel
from smolrun.engine import Engine
from smolrun.turn import DecodeStats, Done, TextDelta
from tests.api.test_files_containers import needs_sandbox
from tests.conftest import Server
from tests.fakes import BatchByteModel, ByteModel, TurnsModel, byte_tokenizer

CHAT = {"model": "byte-model", "messages": [{"role": "user", "content": "hi"}]}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: Server, key: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = httpx.get(server.url.removesuffix("/v1") + "/metrics", headers=headers)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain; version=")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(reply.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split(" "))


def test_a_record_sums_its_turns_and_is_counted_once(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    record = Record("POST", "/v1/responses", started=100.0, id="resp_1", model="m",
                    finish="completed", status=200)
    record.first_token = 100.25
    record.saw(TextDelta("a"))
    record.saw(Done("stop", DecodeStats(10, 5, 0, 5, 0.1, 0.5, cached_tokens=3)))
    record.saw(Done("stop", DecodeStats(20, 3, 0, 3, 0.1, 0.25)))
    with caplog.at_level(logging.INFO, logger="smolrun.requests"):
        metrics.end(record)
        metrics.end(record)  # the middleware's second call, after the last byte: nothing more
    get = metrics.registry.get_sample_value
    model = {"model": "m"}
    assert get("smolrun_requests_total", {"method": "POST", "route": "/v1/responses", "status": "200"}) == 1.0
    assert [get(f"smolrun_{n}_total", model) for n in ("prompt_tokens", "cached_tokens", "completion_tokens",
                                                        "prefix_cache_hits")] == [30.0, 3.0, 8.0, 1.0]
    assert (get("smolrun_time_to_first_token_seconds_sum", model),
            get("smolrun_time_to_first_token_seconds_count", model)) == (0.25, 1.0)
    # 0.75 s of decoding over the 4 + 2 tokens after each turn's first.
    assert (get("smolrun_inter_token_latency_seconds_sum", model),
            get("smolrun_inter_token_latency_seconds_count", model)) == (0.125, 1.0)
    assert get("smolrun_e2e_request_latency_seconds_count", model) == 1.0
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("smolrun.requests", "INFO", "id=resp_1 route=/v1/responses model=m prompt_tokens=30 cached_tokens=3 "
                                     "completion_tokens=8 ttft_s=0.250 tok_s=10.7 finish=completed status=200")]


def test_a_request_refused_before_generating_counts_no_tokens(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    with caplog.at_level(logging.INFO, logger="smolrun.requests"):
        metrics.end(Record("POST", "/v1/chat/completions", status=404))
        metrics.end(Record("GET", "/v1/models", status=200))  # not a generation: counted, not logged
    get = metrics.registry.get_sample_value
    assert get("smolrun_requests_total", {"method": "POST", "route": "/v1/chat/completions", "status": "404"}) == 1.0
    assert get("smolrun_requests_total", {"method": "GET", "route": "/v1/models", "status": "200"}) == 1.0
    assert get("smolrun_prompt_tokens_total", {"model": "-"}) is None
    assert [r.getMessage() for r in caplog.records] == [
        "id=- route=/v1/chat/completions model=- prompt_tokens=0 cached_tokens=0 completion_tokens=0 ttft_s=- "
        "tok_s=- finish=- status=404"]


def test_two_chat_completions_are_counted_exactly(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(ByteModel(script=b"hello")))
    client = server.client()
    plain = client.chat.completions.create(**CHAT)
    chunks = list(client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True}))
    usages = [plain.usage, chunks[-1].usage]
    assert all(u is not None and u.completion_tokens == 5 for u in usages)
    samples = scrape(server)
    model = {"model": "byte-model"}
    assert value(samples, "smolrun_requests_total", method="POST", route="/v1/chat/completions", status="200") == 2.0
    assert value(samples, "smolrun_prompt_tokens_total", **model) == sum(u.prompt_tokens for u in usages)  # type: ignore[union-attr]
    assert value(samples, "smolrun_completion_tokens_total", **model) == 10.0
    assert value(samples, "smolrun_cached_tokens_total", **model) == sum(
        u.prompt_tokens_details.cached_tokens for u in usages)  # type: ignore[union-attr]
    for histogram in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        assert value(samples, f"smolrun_{histogram}_seconds_count", **model) == 2.0, histogram
    assert value(samples, "smolrun_queue_depth", **model) == 0.0
    assert value(samples, "smolrun_kv_cells_used", **model) is None  # one sequence: no shared cache
    assert value(samples, "smolrun_vllm_replicas_up", **model) is None
    assert (value(samples, "smolrun_sandbox_containers_active"), value(samples, "smolrun_sandbox_containers_warm")) \
        == (0.0, 0.0)
    assert value(samples, "smolrun_requests_total", method="GET", route="/metrics", status="200") is None
    again = scrape(server)  # the first scrape is counted once it has been answered
    assert value(again, "smolrun_requests_total", method="GET", route="/metrics", status="200") == 1.0


def test_the_prefix_cache_and_the_kv_cells_of_a_batching_model(make_server) -> None:  # type: ignore[no-untyped-def]
    model = BatchByteModel()
    server = make_server(Engine(model))
    client = server.client()
    body = {**CHAT, "model": "batch-byte-model", "max_tokens": 8}
    usages = [client.chat.completions.create(**body).usage for _ in range(2)]
    cached = [u.prompt_tokens_details.cached_tokens for u in usages]  # type: ignore[union-attr]
    assert cached[0] == 0 and cached[1] > 0  # the same prompt again: the second is partly served from the cache
    samples = scrape(server)
    labels = {"model": "batch-byte-model"}
    assert value(samples, "smolrun_prefix_cache_hits_total", **labels) == 1.0
    assert value(samples, "smolrun_cached_tokens_total", **labels) == float(cached[1])
    assert value(samples, "smolrun_kv_cells_used", **labels) == float(model.used())
    assert value(samples, "smolrun_kv_cells_free", **labels) == float(model.n_ctx - model.used())
    assert (value(samples, "smolrun_running_sequences", **labels), value(samples, "smolrun_queue_depth", **labels)) \
        == (0.0, 0.0)


def test_requests_are_labelled_by_their_route_template(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(ByteModel()))
    root = server.url.removesuffix("/v1")
    assert httpx.get(f"{server.url}/responses/resp_missing").status_code == 404
    assert httpx.get(f"{root}/nowhere/at/all").status_code == 404
    assert httpx.post(f"{server.url}/chat/completions", json={**CHAT, "model": "nope"}).status_code == 404
    samples = scrape(server)
    count = "smolrun_requests_total"
    assert value(samples, count, method="GET", route="/v1/responses/{response_id}", status="404") == 1.0
    assert value(samples, count, method="GET", route="unmatched", status="404") == 1.0
    assert value(samples, count, method="POST", route="/v1/chat/completions", status="404") == 1.0
    assert value(samples, "smolrun_prompt_tokens_total", model="byte-model") == 0.0  # nothing was generated
    assert value(samples, "smolrun_time_to_first_token_seconds_count", model="byte-model") == 0.0


def test_metrics_need_the_api_key(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(ByteModel()), api_key="s3cret")
    url = server.url.removesuffix("/v1") + "/metrics"
    for headers in ({}, {"Authorization": "Bearer nope"}):
        refused = httpx.get(url, headers=headers)
        assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_api_key")
    samples = scrape(server, key="s3cret")
    assert value(samples, "smolrun_requests_total", method="GET", route="/metrics", status="401") == 2.0


def test_each_generation_request_logs_one_line(make_server, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(ByteModel(script=b"hello")))
    client = server.client()
    with caplog.at_level(logging.INFO, logger="smolrun.requests"):
        chat = client.chat.completions.create(**CHAT)
        chunks = list(client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True}))
        response = client.responses.create(model="byte-model", input="hi")
        assert httpx.post(f"{server.url}/chat/completions", json={**CHAT, "model": "nope"}).status_code == 404
        assert client.models.list().data  # not a generation: no line
    lines = [fields(r.getMessage()) for r in caplog.records if r.name == "smolrun.requests"]
    assert [r.levelname for r in caplog.records if r.name == "smolrun.requests"] == ["INFO"] * 4
    timings = [(line.pop("ttft_s"), line.pop("tok_s")) for line in lines]
    assert all(ttft.replace(".", "", 1).isdigit() and len(ttft.split(".")[1]) == 3 for ttft, _ in timings[:3])
    assert all(speed.replace(".", "", 1).isdigit() and len(speed.split(".")[1]) == 1 for _, speed in timings[:3])
    assert timings[3] == ("-", "-")
    usage, streamed = chat.usage, chunks[-1].usage
    assert usage is not None and streamed is not None and response.usage is not None
    assert lines == [
        {"id": chat.id, "route": "/v1/chat/completions", "model": "byte-model",
         "prompt_tokens": str(usage.prompt_tokens), "cached_tokens": str(usage.prompt_tokens_details.cached_tokens),  # type: ignore[union-attr]
         "completion_tokens": "5", "finish": "stop", "status": "200"},
        {"id": chunks[0].id, "route": "/v1/chat/completions", "model": "byte-model",
         "prompt_tokens": str(streamed.prompt_tokens),
         "cached_tokens": str(streamed.prompt_tokens_details.cached_tokens),  # type: ignore[union-attr]
         "completion_tokens": "5", "finish": "stop", "status": "200"},
        {"id": response.id, "route": "/v1/responses", "model": "byte-model",
         "prompt_tokens": str(response.usage.input_tokens),
         "cached_tokens": str(response.usage.input_tokens_details.cached_tokens),
         "completion_tokens": str(response.usage.output_tokens), "finish": "completed", "status": "200"},
        {"id": "-", "route": "/v1/chat/completions", "model": "-", "prompt_tokens": "0", "cached_tokens": "0",
         "completion_tokens": "0", "finish": "-", "status": "404"},
    ]


@needs_sandbox
def test_a_code_interpreter_response_sums_its_turns_and_times_its_cell(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(Engine(TurnsModel(b"```python\nprint(6 * 7)\n```", b"42.")))
    r = server.client().responses.create(model="byte-model", input="6 times 7?",
                                         tools=[{"type": "code_interpreter", "container": {"type": "auto"}}])
    assert r.status == "completed" and [o.type for o in r.output] == ["code_interpreter_call", "message"]
    assert r.usage is not None
    samples = scrape(server)
    model = {"model": "byte-model"}
    assert value(samples, "smolrun_requests_total", method="POST", route="/v1/responses", status="200") == 1.0
    assert value(samples, "smolrun_prompt_tokens_total", **model) == r.usage.input_tokens  # both turns' prompts
    assert value(samples, "smolrun_completion_tokens_total", **model) == r.usage.output_tokens
    assert value(samples, "smolrun_time_to_first_token_seconds_count", **model) == 1.0  # once per request
    assert value(samples, "smolrun_sandbox_exec_seconds_count") == 1.0
    assert value(samples, "smolrun_sandbox_containers_active") == 1.0  # the auto container, still alive


def test_vllm_replicas_up_are_read_when_scraped(make_server) -> None:  # type: ignore[no-untyped-def]
    # The vLLM engine's local side over the byte tokenizer: no request is sent, so no server is needed.
    text = types.SimpleNamespace(n_vocab=257, eog_tokens=frozenset({256}), lltokenizer=byte_tokenizer(),
                                 chat_template=None, bos_token="", eos_token="<eos>")
    replicas = Replicas(["http://a", "http://b"])
    server = make_server(Engine(VllmModel(text, "remote", "remote", 4096, replicas)))  # type: ignore[arg-type]
    assert value(scrape(server), "smolrun_vllm_replicas_up", model="remote") == 2.0
    replicas.failed(replicas.all[0], "ConnectError")
    samples = scrape(server)
    assert value(samples, "smolrun_vllm_replicas_up", model="remote") == 1.0
    assert value(samples, "smolrun_kv_cells_used", model="remote") is None  # vLLM's cache is its own
