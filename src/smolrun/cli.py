"""Command line: thin commands over the library (serve, ask, chat, exec, models)."""

from __future__ import annotations

import base64
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import click

from smolrun.config import Settings, comma_list
from smolrun.errors import InvalidRequest, SmolrunError
from smolrun.models import DEFAULT_MODEL, DEFAULT_TRANSFORMERS_MODEL, DEFAULT_VISION_MODEL, list_models
from smolrun.turn import (
    EFFORTS,
    Done,
    Effort,
    Message,
    Part,
    Reasoning,
    ReasoningDelta,
    ResponseFormat,
    SamplingParams,
    TextDelta,
    Turn,
)

MODEL_HELP = ("registry name, path to a .gguf file, or owner/repo:file.gguf (on transformers also a Hub id or a "
              "directory)")
BACKEND_HELP = ("llama (llama.cpp, GGUF, the default), transformers (Hugging Face models), or vllm (vLLM servers: "
                "GPUs, replicas, many nodes)")
BACKENDS = click.Choice(["llama", "transformers", "vllm"])
MMPROJ_HELP = ("llama.cpp: the vision projector GGUF (path or owner/repo:file.gguf) of the model that sees; "
               "default: the registry's, or the one mmproj*.gguf beside the model")


class _Group(click.Group):
    """Turn smolrun errors into one line on stderr and the error's exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SmolrunError as exc:
            click.echo(f"smolrun: error: {exc.message}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group)
@click.version_option(package_name="smolrun")
def main() -> None:
    """smolrun: small open models behind the OpenAI API, with guaranteed structured outputs."""


@main.command()
@click.option("--model", default=None, help=f"model to serve ({MODEL_HELP}); default {DEFAULT_MODEL}, "
              f"or {DEFAULT_TRANSFORMERS_MODEL} on transformers")
@click.option("--backend", type=BACKENDS, default=None, help=BACKEND_HELP)
@click.option("--device", default=None, help="transformers only: cuda, cuda:1, cpu ... (default: CUDA when present)")
@click.option("--vision-model", default=None,
              help=f"also serve this model for requests with images (e.g. {DEFAULT_VISION_MODEL}); the model name "
                   "'auto' then routes by content")
@click.option("--mmproj", default=None, help=MMPROJ_HELP)
@click.option("--models", "models", multiple=True,
              help="more models to serve, each loaded when a request names it (repeatable, or comma-separated; "
                   "'all': every model on this machine, as `smolrun models` lists them); llama.cpp only")
@click.option("--max-loaded-models", type=click.IntRange(min=1), default=None,
              help="models held in memory at once; the least recently used idle one is unloaded past it (default 3)")
@click.option("--max-loaded-gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="the same for the memory the loaded models take, weights and KV cache (default: no limit)")
@click.option("--host", default=None, help="address to bind (default 127.0.0.1)")
@click.option("--port", type=int, default=None, help="port (default 8000)")
@click.option("--api-key", default=None, help="require this key as a Bearer token (or SMOLRUN_API_KEY)")
@click.option("--allowed-hosts", "allowed_hosts", multiple=True,
              help="a Host name to answer besides localhost, 127.0.0.1 and [::1] (repeatable, or comma-separated; "
                   "'*' turns the check off); bound to a non-loopback address without it, any Host is answered")
@click.option("--allowed-origins", "allowed_origins", multiple=True,
              help="a web page origin allowed to call the API, with CORS, e.g. http://localhost:3000 (repeatable, or "
                   "comma-separated; '*' allows every origin); default: only the server's own (the playground)")
@click.option("--n-ctx", type=int, default=None, help="context window in tokens (default 8192)")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all available)")
@click.option("--max-queue", type=int, default=None, help="waiting requests before 429 (default 16)")
@click.option("--stream-interval-ms", type=click.IntRange(min=0), default=None,
              help="tokens that come within this many ms of the last streamed chunk go out with the next one, "
                   "which spares the CPU a chunk per token on small models; 0: a chunk per token (default 20)")
@click.option("--parallel", type=click.IntRange(min=1, max=64), default=None,
              help="llama.cpp: requests decoded together in one batch, sharing the --n-ctx cache (default 4)")
@click.option("--gpu-layers", type=int, default=None,
              help="llama.cpp: layers offloaded to the GPU, -1 for all (default: all when this llama.cpp build "
                   "has CUDA or Metal, else 0)")
@click.option("--max-calls-per-turn", type=click.IntRange(min=1), default=None,
              help="function calls one model turn may make with parallel_tool_calls (default 8)")
@click.option("--dry-multiplier", type=click.FloatRange(0, 10), default=None,
              help="strength of the DRY repetition penalty inside JSON answers, which ends the loops of small models; "
                   "0 turns it off; requests may set their own (default 0.8)")
@click.option("--vllm-url", "vllm_urls", multiple=True,
              help="vllm: a running vLLM server of --model, e.g. http://gpu1:8000 (repeat for replicas); none: "
                   "smolrun launches `vllm serve` here and stops it on exit")
@click.option("--vllm-arg", "vllm_args", multiple=True,
              help="vllm: one more argument for the launched `vllm serve` (repeatable), e.g. "
                   "--vllm-arg=--tensor-parallel-size=2")
@click.option("--vllm-python", default=None,
              help="vllm: the Python whose vLLM to launch (default: the one `make vllm` installs)")
@click.option("--max-inflight", type=click.IntRange(min=1), default=None,
              help="vllm: requests on its servers at once; --max-queue more wait (default 64)")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="uploaded files and the metadata database (default /var/lib/smolrun as root, else "
                   "~/.local/share/smolrun)")
@click.option("--max-file-mb", type=click.IntRange(min=1), default=None, help="largest upload (default 512)")
@click.option("--max-body-mb", type=click.IntRange(min=1), default=None,
              help="largest JSON request body, pictures as data URLs included (default 64)")
@click.option("--warm-containers", type=click.IntRange(min=0), default=None,
              help="sandboxes kept ready with pandas imported (default 1)")
def serve(**options: Any) -> None:
    """Serve the OpenAI-compatible API."""
    import uvicorn

    from smolrun.api import create_app
    from smolrun.api.browser import BrowserPolicy
    from smolrun.engine import Engine
    from smolrun.pool import ModelPool

    options = {k: (v or None) if isinstance(v, tuple) else v for k, v in options.items()}  # unset: no ()
    for name in ("allowed_hosts", "allowed_origins", "models"):
        options[name] = comma_list(*options[name]) if options[name] else None
    settings = Settings.from_env(**options)
    policy = BrowserPolicy.build(settings.host, settings.allowed_hosts, settings.allowed_origins)
    if not settings.api_key and policy.hosts is None:
        click.echo(f"smolrun: warning: {settings.host}:{settings.port} answers any Host and no --api-key is set: "
                   "whoever reaches this port, and any web page through DNS rebinding, can use the API; set "
                   "--api-key, or --allowed-hosts with the names clients use", err=True)
    click.echo(f"smolrun: loading {settings.model} on {settings.backend} ...", err=True)
    engine = Engine.load(settings, mmproj=None if settings.vision_model else settings.mmproj)
    vision = None
    if settings.vision_model:
        click.echo(f"smolrun: loading {settings.vision_model} (vision) on {settings.backend} ...", err=True)
        vision = Engine.load(settings, settings.vision_model, settings.mmproj)
        if not vision.sees:
            raise InvalidRequest(f"--vision-model {settings.vision_model} cannot see images; use a SmolVLM model "
                                 f"such as {DEFAULT_VISION_MODEL}")
    pool = ModelPool.serving(settings, engine, vision)
    app = create_app(pool, settings)
    click.echo(_banner(settings, engine.name), err=True)
    if vision is not None:
        click.echo(f"vision: {vision.name} answers requests with images sent to it or to the model 'auto'\n",
                   err=True)
    if len(pool.models) > len(pool.loaded()):
        more = ", ".join(m.name for m in pool.models if m.engine is None)
        click.echo(f"on demand: {more} (loaded when a request names one; at most {pool.max_loaded} in memory)\n",
                   err=True)
    from smolrun.sandbox import default_config, unavailable_reason

    reason = unavailable_reason(default_config())
    click.echo(f"code execution: {'ready' if reason is None else 'unavailable, ' + reason}\n", err=True)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", log_config=_log_config())
    finally:
        pool.shutdown()


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, with smolrun's loggers (the per-request lines among them) beside its own."""
    from uvicorn.config import LOGGING_CONFIG

    smolrun = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return {**LOGGING_CONFIG, "loggers": {**LOGGING_CONFIG["loggers"], "smolrun": smolrun}}


def _banner(settings: Settings, model: str) -> str:
    base = f"http://{settings.host}:{settings.port}/v1"
    key = settings.api_key or "none"
    auth = f' -H "Authorization: Bearer {settings.api_key}"' if settings.api_key else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello"}]})
    return f"""
smolrun is serving {model} at {base}

  curl {base}/chat/completions -H "Content-Type: application/json"{auth} \\
    -d '{body}'

  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key="{key}")
  print(client.chat.completions.create(model="{model}",
        messages=[{{"role": "user", "content": "Say hello"}}]).choices[0].message.content)
"""


@main.command()
@click.argument("prompt")
@click.option("--model", default=None, help=f"{MODEL_HELP}; default {DEFAULT_MODEL}")
@click.option("--backend", type=BACKENDS, default=None, help=BACKEND_HELP)
@click.option("--schema", "schema_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON Schema file the answer must match")
@click.option("--json", "json_mode", is_flag=True, help="answer with any JSON object")
@click.option("--strict/--no-strict", default=False, help="apply OpenAI's strict-mode schema rules")
@click.option("--system", default=None, help="system message")
@click.option("--stream", is_flag=True, help="print the answer as it is generated")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="the most tokens the answer may take")
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--frequency-penalty", type=click.FloatRange(-2, 2), default=0.0, show_default=True,
              help="discourage repeating tokens (helps tiny models end their answers)")
@click.option("--file", "files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="give the model this file in /mnt/data and let it run Python (repeatable)")
@click.option("--code", is_flag=True, help="let the model run Python in a sandbox before answering")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=f"show the model this picture, PDF or video (repeatable); default model {DEFAULT_VISION_MODEL}")
@click.option("--detail", type=click.Choice(["low", "high", "auto"]), default="auto", show_default=True,
              help="low: each picture as one tile; high/auto: split into tiles plus an overview")
@click.option("--mmproj", default=None, help=MMPROJ_HELP)
@click.option("--max-tool-calls", type=click.IntRange(min=0), default=4, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (default: those idle when it starts, so a busy server beside it is not stalled)")
@click.option("--reasoning-effort", type=click.Choice(EFFORTS), default=None,
              help="how long a thinking model (SmolLM3) may think; 'none' switches thinking off")
@click.option("--thinking-budget", type=click.IntRange(min=1), default=None,
              help="the most tokens a thinking model may think (overrides the effort's budget)")
def ask(prompt: str, model: str | None, backend: str | None, schema_file: Path | None, json_mode: bool, strict: bool,
        system: str | None, stream: bool, max_tokens: int | None, temperature: float, seed: int | None,
        frequency_penalty: float, files: tuple[Path, ...], code: bool, images: tuple[Path, ...], detail: str,
        mmproj: str | None, max_tool_calls: int, threads: int | None, reasoning_effort: Effort | None,
        thinking_budget: int | None) -> None:
    """Answer PROMPT once with a local model (no server needed).

    With --file or --code the model may write Python, which runs in a sandboxed container; each cell and
    its output are shown as they run, then the answer. With --image a vision model looks at pictures,
    PDF pages or video frames first.
    """
    from smolrun import media
    from smolrun.engine import Engine

    if schema_file is not None and json_mode:
        raise click.UsageError("use either --schema or --json, not both")
    fmt = _load_format(schema_file, strict) if schema_file else ResponseFormat("json_object") if json_mode else None
    shown: list[Part] = []
    for path in images:
        shown += media.load(path.read_bytes(), str(path), detail)  # type: ignore[arg-type]
    messages = ((Message("system", system),) if system else ()) + (Message.of("user", [*shown, prompt]),)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                            frequency_penalty=frequency_penalty)
    turn = Turn(messages, fmt or ResponseFormat(), params, reasoning=Reasoning(reasoning_effort, thinking_budget))
    settings = Settings.from_env(model=model, backend=backend, mmproj=mmproj, threads=threads)
    if settings.threads is None and settings.backend != "vllm":
        from smolrun.backends.llama_cpp import idle_threads

        settings = replace(settings, threads=idle_threads())
    if images and model is None:
        model = settings.vision_model or DEFAULT_VISION_MODEL
    engine = Engine.load(settings, model, settings.mmproj)
    try:
        if files or code:
            import asyncio

            asyncio.run(_ask_with_code(engine, turn, files, max_tool_calls))
        else:
            _answer(engine, turn, stream, fmt is not None)
    finally:
        engine.shutdown()


def _answer(engine: Any, turn: Turn, stream: bool, typed: bool) -> None:
    parts: list[str] = []
    done: Done | None = None
    progress = _Progress() if not stream and sys.stderr.isatty() else None
    for event in engine.generate(engine.prepare(turn)):
        if isinstance(event, TextDelta):
            parts.append(event.text)
            if progress is not None:
                progress.add(len(event.tokens))
            if stream:
                click.echo(event.text, nl=False)
        elif isinstance(event, ReasoningDelta):  # thoughts on stderr: stdout stays the answer alone
            click.secho(event.text, nl=False, err=True, dim=True)
        else:
            done = event
    if progress is not None:
        progress.clear()
    text = "".join(parts)
    if stream:
        click.echo()
    elif typed and done is not None and (done.finish_reason == "stop" or done.stats.closed):
        click.echo(json.dumps(json.loads(text), indent=2, ensure_ascii=False))
    else:
        click.echo(text)
    if done is not None and done.stats.closed:
        click.echo("smolrun: the answer reached the token limit (--max-tokens) and was closed there: the document "
                   "is valid, its last values are cut short", err=True)
    elif done is not None and done.finish_reason == "length":
        click.echo("smolrun: the answer was cut at the token limit (--max-tokens)", err=True)
        sys.exit(1)


class _Progress:
    """Tokens so far and their rate, on one stderr line redrawn a few times a second (a terminal only)."""

    def __init__(self) -> None:
        import time

        self._clock = time.perf_counter
        self.started = self.shown = self._clock()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        now = self._clock()
        if now - self.shown >= 0.25:
            self.shown = now
            rate = self.tokens / max(now - self.started, 1e-9)
            sys.stderr.write(f"\rsmolrun: {self.tokens} tokens, {rate:.0f} tokens/s".ljust(60))
            sys.stderr.flush()

    def clear(self) -> None:
        if self.shown > self.started:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


async def _ask_with_code(engine: Any, turn: Turn, files: tuple[Path, ...], max_tool_calls: int) -> None:
    """The Responses loop, locally: stream each code cell, its output, then the answer."""
    import asyncio

    from smolrun.runner import CodeCallItem, Delta, Finished, Interpreting, ItemAdded, ItemDone, RunSpec, logs_text, run
    from smolrun.sandbox import Container, Execution, default_config

    container: Container | None = None
    names = [f"/mnt/data/{p.name}" for p in files]
    messages = turn.messages + ((Message("user", "Files available: " + ", ".join(names)),) if names else ())

    async def execute(code: str) -> tuple[str, Execution]:
        nonlocal container
        if container is None:  # created at the first code call only
            container = Container(default_config()).start()
            for path in files:
                container.put_file(path.name, path.read_bytes())
        result = await asyncio.to_thread(container.run, code)
        return container.id, result

    spec = RunSpec(messages, turn.format, turn.params, code=True, max_tool_calls=max_tool_calls,
                   reasoning=turn.reasoning)
    answer: list[str] = []
    finished: Finished | None = None
    try:
        async for event in run(spec, engine, engine.stream, execute):
            if isinstance(event, ItemAdded) and isinstance(event.item, CodeCallItem):
                click.secho("── python ──", fg="cyan", err=True)
            elif isinstance(event, Delta) and event.kind == "code":
                click.echo(event.text, nl=False, err=True)
            elif isinstance(event, Delta) and event.kind == "reasoning":
                click.secho(event.text, nl=False, err=True, dim=True)
            elif isinstance(event, Interpreting):
                click.secho("\n── output ──", fg="cyan", err=True)
            elif isinstance(event, ItemDone) and isinstance(event.item, CodeCallItem):
                result = event.item.result
                click.echo((logs_text(result) if result is not None else "") or "(no output)", err=True)
            elif isinstance(event, Delta):
                answer.append(event.text)
            elif isinstance(event, Finished):
                finished = event
    finally:
        if container is not None:
            container.close()
    text = "".join(answer)
    if turn.format.type != "text" and finished is not None and finished.status == "completed":
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    click.secho("── answer ──", fg="cyan", err=True)
    click.echo(text)
    if finished is not None and finished.status == "incomplete":
        click.echo("smolrun: the answer was cut at the token limit (--max-tokens)", err=True)
        sys.exit(1)


def _load_format(path: Path, strict: bool) -> ResponseFormat:
    from smolrun.constraints import check_schema

    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidRequest(f"cannot read schema file {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"schema file {path} is not valid JSON: {exc}") from exc
    name = path.stem if path.stem.replace("-", "").replace("_", "").isalnum() else "schema"
    return ResponseFormat("json_schema", check_schema(schema, strict=strict, what=f"schema file {path}"), name, strict)


@main.command()
@click.option("--model", default=None, help=f"{MODEL_HELP}; default {DEFAULT_MODEL}, or the server's first model")
@click.option("--backend", type=BACKENDS, default=None, help=BACKEND_HELP)
@click.option("--url", default=None, help="talk to a running server instead, e.g. http://127.0.0.1:8000")
@click.option("--api-key", default=None, help="with --url (or SMOLRUN_API_KEY)")
@click.option("--system", default=None, help="system message")
@click.option("--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="the most tokens one answer may take")
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.7, show_default=True)
@click.option("--reasoning-effort", type=click.Choice(EFFORTS), default=None,
              help="how long a thinking model (SmolLM3) may think; 'none' switches thinking off")
def chat(model: str | None, backend: str | None, url: str | None, api_key: str | None, system: str | None,
         max_tokens: int, temperature: float, reasoning_effort: Effort | None) -> None:
    """Talk with a model: history, streamed answers, /reset, /schema FILE, /file PATH (/help lists them).

    Ctrl+C stops the answer being written; Ctrl+D or /bye leaves.
    """
    from smolrun import repl

    options: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature,
                               **({"reasoning_effort": reasoning_effort} if reasoning_effort else {})}
    if url is not None:
        repl.main(repl.RemoteTalker(url, api_key or Settings.from_env().api_key, model), system, options)
        return
    from smolrun.engine import Engine

    engine = Engine.load(Settings.from_env(model=model, backend=backend))
    try:
        repl.main(repl.LocalTalker(engine), system, options)
    finally:
        engine.shutdown()


@main.command(name="exec")
@click.argument("source", type=click.File("r", encoding="utf-8"))
@click.option("--file", "files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="copy this file into /mnt/data first (repeatable)")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True, help="seconds")
@click.option("--save-images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="write the PNG images the code produced into this directory")
@click.option("--container", "container_id", default=None,
              help="run in this container of a running server (state persists between calls)")
@click.option("--server", default="http://127.0.0.1:8000", show_default=True, help="with --container")
@click.option("--api-key", default=None, help="with --container (or SMOLRUN_API_KEY)")
def exec_(source: Any, files: tuple[Path, ...], timeout: float, save_images: Path | None, container_id: str | None,
          server: str, api_key: str | None) -> None:
    """Run Python from SOURCE (a file, or - for stdin) in a sandboxed container.

    Without --container: a fresh local container, removed afterwards. Exactly the sandbox and limits that
    model-written code gets. Prints the output, the last expression's value and any traceback; exits 1 when
    the code raised.
    """
    code = source.read()
    if container_id is not None:
        if files:
            raise click.UsageError("--file works with a local container; upload to a server's container with "
                                   "POST /v1/containers/{id}/files")
        key = api_key or Settings.from_env().api_key
        reply = _remote_exec(server, container_id, code, timeout, key)
    else:
        from smolrun.sandbox import Container, default_config

        container = Container(default_config(), preload=()).start()
        try:
            for path in files:
                container.put_file(path.name, path.read_bytes())
            result = container.run(code, timeout=timeout)
        finally:
            container.close()
        reply = {
            "logs": result.logs, "result": result.result, "files": [{"path": p} for p in result.files],
            "images": [base64.b64encode(png).decode() for png in result.images],
            "error": asdict(result.error) if result.error is not None else None,
        }
    _print_execution(reply, save_images)


def _remote_exec(server: str, container_id: str, code: str, timeout: float, api_key: str | None) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{server.rstrip('/')}/v1/containers/{container_id}/exec", method="POST",
        data=json.dumps({"code": code, "timeout": timeout}).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout + 30) as response:
            reply: dict[str, Any] = json.load(response)
    except urllib.error.HTTPError as exc:
        message = json.load(exc).get("error", {}).get("message", exc.reason)
        raise InvalidRequest(f"the server refused: {message}") from None
    except OSError as exc:
        raise InvalidRequest(f"cannot reach {server}: {exc}") from None
    reply["images"] = [i.split(",", 1)[1] for i in reply.get("images", [])]
    return reply


def _print_execution(reply: dict[str, Any], save_images: Path | None) -> None:
    click.echo(reply["logs"], nl=False)
    if reply.get("result") is not None:
        click.echo(reply["result"])
    for i, png in enumerate(base64.b64decode(b) for b in reply.get("images", [])):
        if save_images is not None:
            save_images.mkdir(parents=True, exist_ok=True)
            (save_images / f"image-{i + 1}.png").write_bytes(png)
        click.echo(f"[image {i + 1}: {len(png)} bytes PNG{' saved' if save_images else ''}]", err=True)
    if reply.get("files"):
        click.echo(f"[files written: {', '.join(f['path'] for f in reply['files'])}]", err=True)
    error = reply.get("error")
    if error:
        click.echo(error["traceback"] or f"{error['name']}: {error['value']}", err=True)
        sys.exit(1)


@main.command()
def models() -> None:
    """List the models: the registry's, those pulled, and GGUF files in the Hugging Face cache."""
    entries = list_models()
    rows: list[tuple[str, str, str, str, str]] = [
        (e.name, e.status, _size(e.size), e.capabilities, str(e.path) if e.path else e.description) for e in entries]
    _table([("NAME", "STATUS", "SIZE", "CAPABILITIES", "WHERE"), *rows])


def _table(rows: list[tuple[str, ...]]) -> None:
    """Rows in aligned columns, the last one left as long as it is."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    return f"{size / 2**30:.1f} GB" if size >= 2**30 else f"{size / 2**20:.0f} MB"


@main.command()
@click.argument("name")
def pull(name: str) -> None:
    """Fetch a model so that it serves offline: a registry name, owner/repo:file.gguf, or a local .gguf file
    (copied into smolrun's store, then known by its file name)."""
    from smolrun.models.registry import pull as fetch

    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label=f"copying {Path(name).name}", file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)

    try:
        resolved = fetch(name, progress=progress)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    click.echo(f"{resolved.name}  {_size(resolved.path.stat().st_size)}  {resolved.path}")


@main.command()
@click.argument("name")
def rm(name: str) -> None:
    """Delete a pulled or downloaded model's file."""
    from smolrun.models.registry import remove

    click.echo(f"removed {remove(name)}")


@main.command()
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="the running server")
@click.option("--api-key", default=None, help="its key (or SMOLRUN_API_KEY)")
def ps(url: str, api_key: str | None) -> None:
    """The models a running server holds, with their memory (weights and KV cache)."""
    import urllib.error
    import urllib.request

    key = api_key or Settings.from_env().api_key
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/models",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            cards = json.load(response)["data"]
    except urllib.error.HTTPError as exc:
        raise InvalidRequest(f"the server at {url} refused: HTTP {exc.code}") from None
    except OSError as exc:
        raise InvalidRequest(f"cannot reach a server at {url}: {exc}") from None
    rows: list[tuple[str, ...]] = [("NAME", "LOADED", "MEMORY", "CAPABILITIES")]
    for card in cards:
        caps = ", ".join(k for k, v in (card.get("capabilities") or {}).items() if v) or "text"
        rows.append((card["id"], "yes" if card.get("loaded", True) else "no", _size(card.get("memory_bytes")), caps))
    _table(rows)
