"""The vLLM engine: turns prepared here (prompt tokens, turn grammar), decoded by vLLM servers, replayed here.

smolrun renders and tokenizes every prompt and compiles every grammar with the model's own tokenizer, so each
400 comes before anything is sent. vLLM's `/v1/completions` gets the prompt as token ids and the turn grammar
as llguidance Lark, and streams token ids back. vLLM turns a grammar failure into a plain end of text (its log
alone says why), so every returned token goes through the local matcher: a token the grammar does not allow,
or an end before the grammar's, is an error, never a silently cut answer.

Several servers are replicas: a request goes to the one with the fewest requests in flight; one that stops
answering is left out for a while, then tried again. The requests run on one thread of their own, on its own
event loop, so that the CLI and the server drive this engine alike.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from smolrun.backends.decode import Prepared, SequenceState
from smolrun.backends.tokenizer import HFTokenizer
from smolrun.errors import (
    SHUTTING_DOWN,
    BackendMissing,
    EngineUnavailable,
    GenerationFailed,
    QueueFull,
    ServerShuttingDown,
)
from smolrun.scheduler import Guarded, Sink
from smolrun.turn import Done, Event, SamplingParams

GUIDANCE = '{"backend": "guidance"}'  # vLLM's --structured-outputs-config for llguidance
READ_TIMEOUT_S = 300.0  # silence from a replica that long (a long prefill on a CPU, at worst) counts as down
RETRY_S = 5.0  # a replica that failed is tried again after this, doubling up to a minute while it fails


def _httpx() -> Any:
    try:
        import httpx
    except ImportError as exc:
        raise BackendMissing("the vLLM engine needs httpx and transformers: pip install 'smolrun[vllm]'") from exc
    return httpx


@dataclass(eq=False)
class Replica:
    """One vLLM server: its base URL (without /v1), the requests in flight on it, whether it is left out."""

    url: str
    outstanding: int = 0
    failures: int = 0
    down_until: float = 0.0
    reason: str = ""


class Replicas:
    """Servers of one model; `pick` is least outstanding requests among those not left out."""

    def __init__(self, urls: Sequence[str], retry_s: float = RETRY_S) -> None:
        if not urls:
            raise ValueError("no vLLM server URL")
        self.all = [Replica(u.rstrip("/").removesuffix("/v1")) for u in urls]
        self.retry_s = retry_s
        self._next = 0  # ties go round the list

    def pick(self) -> Replica:
        now = time.monotonic()
        up = [r for r in self.all if r.down_until <= now]
        if not up:
            why = "; ".join(f"{r.url}: {r.reason}" for r in self.all)
            soonest = math.ceil(min(r.down_until for r in self.all) - now)
            raise EngineUnavailable(f"no vLLM server answers ({why}); the first is tried again in {soonest} s")
        self._next = (self._next + 1) % len(self.all)
        return min(up, key=lambda r: (r.outstanding, (self.all.index(r) - self._next) % len(self.all)))

    def up(self) -> int:
        """Replicas not left out after a failure."""
        now = time.monotonic()
        return sum(r.down_until <= now for r in self.all)

    def failed(self, replica: Replica, reason: str) -> None:
        replica.failures += 1
        replica.reason = reason
        replica.down_until = time.monotonic() + self._backoff(replica.failures)

    def answered(self, replica: Replica) -> None:
        replica.failures, replica.reason = 0, ""

    def _backoff(self, failures: int) -> float:
        return float(min(self.retry_s * 2 ** (failures - 1), 60.0))


class VllmModel:
    """A model whose weights a vLLM server holds: its tokenizer here (to render, tokenize and constrain), the
    decoding there. No pictures: smolrun's own prompt layout for them is not what vLLM's processor builds."""

    vision = None
    reused = 0

    def __init__(self, text: HFTokenizer, name: str, served: str, n_ctx: int, replicas: Replicas,
                 on_close: Callable[[], None] | None = None) -> None:
        self.text = text
        self.name = name
        self.served = served  # the model's id on the vLLM servers
        self.n_ctx = n_ctx
        self.replicas = replicas
        self.n_vocab = text.n_vocab
        self.eog_tokens = text.eog_tokens
        self.lltokenizer = text.lltokenizer
        self.chat_template = text.chat_template
        self.bos_token, self.eos_token = text.bos_token, text.eos_token
        self._on_close = on_close

    def tokenize(self, text: str) -> list[int]:
        return self.text.tokenize(text)

    def token_bytes(self, token: int) -> bytes:
        return self.text.token_bytes(token)

    def close(self) -> None:
        """Stop the vLLM server this process launched, if any."""
        if self._on_close is not None:
            self._on_close()


def completion_body(model: VllmModel, prompt: Sequence[int], grammar: str | None, params: SamplingParams,
                    max_tokens: int) -> dict[str, Any]:
    """The `/v1/completions` request for one turn: the prompt as token ids, the turn grammar as Lark."""
    body: dict[str, Any] = {
        "model": model.served, "prompt": list(prompt), "max_tokens": max_tokens, "n": 1,
        "temperature": params.temperature, "top_p": params.top_p,
        "frequency_penalty": params.frequency_penalty, "presence_penalty": params.presence_penalty,
        "stop": list(params.stop), "stop_token_ids": sorted(model.eog_tokens),
        "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True},
    }
    if params.top_k > 0:
        body["top_k"] = params.top_k
    if params.seed is not None:
        body["seed"] = params.seed
    if grammar is not None:
        body["structured_outputs"] = {"grammar": grammar}
    return body


@dataclass(eq=False)
class RemoteJob(Guarded):
    """One turn for a vLLM server: its request body, and its local decoding state that replays the tokens
    (`send`: a sink that raises ends this request only)."""

    body: dict[str, Any]
    state: SequenceState
    sink: Sink
    cancelled: Callable[[], bool]


class _Unreachable(Exception):
    """The replica did not answer (refused, reset, timed out, 5xx): another replica may."""


class VllmRunner:
    """Requests to the replicas of one model, at most `max_inflight` at a time and `max_queue` more waiting
    (then QueueFull, a 429). Batching is vLLM's: nothing here serialises requests."""

    def __init__(self, model: VllmModel, max_queue: int, max_inflight: int = 64) -> None:
        self.model = model
        self.max_queue = max_queue
        self.max_inflight = max_inflight
        self._admitted = 0  # in flight or waiting for a place
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()  # every request's, for close() to end them
        self._closed = False
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="smolrun-vllm", daemon=True)
        self._thread.start()
        self._places = asyncio.run_coroutine_threadsafe(self._setup(), self._loop).result()

    async def _setup(self) -> asyncio.Semaphore:
        httpx = _httpx()
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=READ_TIMEOUT_S),
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=32))
        return asyncio.Semaphore(self.max_inflight)

    def submit(self, prepared: Prepared, sink: Sink, cancelled: Callable[[], bool], bounded: bool = True) -> None:
        """Send a prepared turn to a replica (see enqueue): the body of its request, and its local decoding state
        that replays the tokens the server returns."""
        state = SequenceState.of(prepared, self.model)
        source = prepared.grammar.source if prepared.grammar is not None else None
        body = completion_body(self.model, prepared.prompt, source, prepared.params, state.budget)
        self.enqueue(RemoteJob(body, state, sink, cancelled), bounded)

    def enqueue(self, job: RemoteJob, bounded: bool = True) -> Future[None]:
        """`bounded`: refused (QueueFull) past max_inflight + max_queue; a later turn of an admitted response is not.
        After close(), ServerShuttingDown (a 503)."""
        with self._lock:  # scheduled under the lock: every request close() does not refuse, it ends
            if self._closed:
                raise ServerShuttingDown(SHUTTING_DOWN)
            if bounded and self._admitted >= self.max_inflight + self.max_queue:
                raise QueueFull("the vLLM engine is busy: too many requests are waiting; retry shortly")
            self._admitted += 1
            return asyncio.run_coroutine_threadsafe(self._run(job), self._loop)

    def waiting(self) -> int:
        with self._lock:
            return max(0, self._admitted - self._inflight)

    def running(self) -> int:
        with self._lock:
            return self._inflight

    def kv_used(self) -> int | None:
        """None: the servers hold the cache."""
        return None

    def close(self) -> None:
        """End every request in flight or waiting for a place with ServerShuttingDown (their upstream requests
        are closed, which vLLM aborts), close the connections, and return once the loop's thread has exited."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # Scheduled after every submitted request (the loop runs callbacks in order): each has registered
            # its task by the time this runs.
            ended = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        ended.result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _shutdown(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()

    async def _run(self, job: RemoteJob) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # before any await: close() may come next
        try:
            async with self._places:
                with self._lock:
                    self._inflight += 1
                try:
                    await self._serve(job)
                finally:
                    with self._lock:
                        self._inflight -= 1
        except asyncio.CancelledError:  # only close() cancels a request's task
            job.send(ServerShuttingDown(SHUTTING_DOWN))
        except Exception as exc:  # handed to the waiting request, which re-raises it
            job.send(exc)
        finally:
            self._tasks.discard(task)
            with self._lock:
                self._admitted -= 1
            job.send(None)

    async def _serve(self, job: RemoteJob) -> None:
        """Stream the turn, and close the upstream request (vLLM then aborts it) as soon as the client leaves,
        even while no token comes (a long prefill)."""
        if job.cancelled():
            return
        task = asyncio.ensure_future(self._attempts(job))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.05)
                if not task.done() and (job.cancelled() or job.failed):
                    break
        finally:  # the client left, its sink failed, or close() cancelled this request: close the upstream one
            left = not task.done()
            if left:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if left:
            job.state.finish("cancelled")
            job.send(job.state.take())
            return
        task.result()

    async def _attempts(self, job: RemoteJob) -> None:
        """One replica after another until one answers; a request that already has tokens cannot move."""
        while True:
            replica = self.model.replicas.pick()
            replica.outstanding += 1
            try:
                await self._stream(replica, job)
                self.model.replicas.answered(replica)
                return
            except _Unreachable as exc:
                self.model.replicas.failed(replica, str(exc))
                if job.state.passes:
                    raise GenerationFailed(
                        f"the vLLM server at {replica.url} stopped answering after {job.state.generated} tokens of "
                        f"this answer ({exc}); later requests go to the other servers") from exc
            finally:
                replica.outstanding -= 1

    async def _stream(self, replica: Replica, job: RemoteJob) -> None:
        httpx = _httpx()
        state = job.state
        try:
            async with self._client.stream("POST", f"{replica.url}/v1/completions", json=job.body) as response:
                if response.status_code != 200:
                    detail = _message(await response.aread())
                    if response.status_code >= 500:
                        raise _Unreachable(f"HTTP {response.status_code}: {detail}")
                    raise GenerationFailed(f"the vLLM server at {replica.url} refused the request "
                                           f"(HTTP {response.status_code}): {detail}")
                finish: str | None = None
                done: Done | None = None  # held back until vLLM's last chunk says how much of the prompt it cached
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        break
                    chunk = _chunk(replica, line[6:], state.generated)
                    choices = chunk.get("choices") or ()
                    if done is not None:
                        usage = chunk.get("usage") or {}
                        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                        if cached:
                            done = Done(done.finish_reason, replace(done.stats, cached_tokens=int(cached)))
                        if any(c.get("token_ids") for c in choices):
                            break  # vLLM goes on past the local end (a stop sequence): closing aborts it
                        continue
                    for choice in choices:
                        for token in choice.get("token_ids") or ():
                            if not state.done:
                                state.replay(int(token))
                        finish = choice.get("finish_reason") or finish
                    events = state.take()
                    if state.done:
                        events, done = _hold_done(events)
                    if events:
                        job.send(events)
                if done is None:
                    self._end(replica, state, finish)
                    events, done = _hold_done(state.take())
                    job.send(events)
                job.send([done])
        except httpx.TransportError as exc:
            raise _Unreachable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc

    def _end(self, replica: Replica, state: SequenceState, finish: str | None) -> None:
        """The stream ended before the local state did: vLLM's reason must agree with the grammar."""
        matcher = state.matcher
        if finish == "length":
            state.finish("length")
        elif finish == "stop" and (matcher is None or matcher.is_accepting()):
            state.finish("stop")
        elif finish is None:
            raise _Unreachable("the stream ended without a finish reason")
        else:
            raise GenerationFailed(
                f"the vLLM server at {replica.url} ended the answer after {state.generated} tokens "
                f"(finish_reason {finish!r}) where the grammar does not allow it to end: its structured-output "
                "backend failed (its log says why; it must run with --structured-outputs-config "
                f"'{GUIDANCE}')")


def _message(body: bytes) -> str:
    """vLLM's error message, from OpenAI's error shape, else the start of the body."""
    try:
        data = json.loads(body)
        error = data.get("error", data) if isinstance(data, dict) else data
        message = error.get("message") if isinstance(error, dict) else None
        if isinstance(message, str):
            return message[:500]
    except ValueError:
        pass
    return body[:500].decode("utf-8", "replace")


def _hold_done(events: list[Event]) -> tuple[list[Event], Done]:
    """A finished state's events, less its last one: the Done."""
    done = events[-1]
    assert isinstance(done, Done)
    return events[:-1], done


def _chunk(replica: Replica, data: str, generated: int) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        chunk = None
    if not isinstance(chunk, dict):
        raise GenerationFailed(f"the vLLM server at {replica.url} sent a malformed stream after {generated} tokens")
    if "error" in chunk:
        raise GenerationFailed(f"the vLLM server at {replica.url} failed mid-answer after {generated} tokens: "
                               f"{_message(json.dumps(chunk).encode())}")
    return chunk
