"""Command line: thin commands over the library (serve, ask, models)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from smolrun.config import Settings
from smolrun.errors import InvalidRequest, SmolrunError
from smolrun.models import DEFAULT_MODEL, list_models
from smolrun.turn import Done, Message, ResponseFormat, SamplingParams, TextDelta, Turn

MODEL_HELP = "registry name, path to a .gguf file, or owner/repo:file.gguf"


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
@click.option("--model", default=None, help=f"model to serve ({MODEL_HELP}); default {DEFAULT_MODEL}")
@click.option("--host", default=None, help="address to bind (default 127.0.0.1)")
@click.option("--port", type=int, default=None, help="port (default 8000)")
@click.option("--api-key", default=None, help="require this key as a Bearer token (or SMOLRUN_API_KEY)")
@click.option("--n-ctx", type=int, default=None, help="context window in tokens (default 8192)")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all available)")
@click.option("--max-queue", type=int, default=None, help="waiting requests before 429 (default 16)")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="uploaded files and the metadata database (default /var/lib/smolrun as root, else "
                   "~/.local/share/smolrun)")
@click.option("--max-file-mb", type=click.IntRange(min=1), default=None, help="largest upload (default 512)")
@click.option("--warm-containers", type=click.IntRange(min=0), default=None,
              help="sandboxes kept ready with pandas imported (default 1)")
def serve(**options: Any) -> None:
    """Serve the OpenAI-compatible API."""
    import uvicorn

    from smolrun.api import create_app
    from smolrun.engine import Engine

    settings = Settings.from_env(**options)
    click.echo(f"smolrun: loading {settings.model} ...", err=True)
    engine = Engine.load(settings)
    app = create_app(engine, settings)
    click.echo(_banner(settings, engine.name), err=True)
    from smolrun.sandbox import default_config, unavailable_reason

    reason = unavailable_reason(default_config())
    click.echo(f"code execution: {'ready' if reason is None else 'unavailable, ' + reason}\n", err=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


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
@click.option("--schema", "schema_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON Schema file the answer must match")
@click.option("--json", "json_mode", is_flag=True, help="answer with any JSON object")
@click.option("--strict/--no-strict", default=False, help="apply OpenAI's strict-mode schema rules")
@click.option("--system", default=None, help="system message")
@click.option("--stream", is_flag=True, help="print the answer as it is generated")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None)
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--frequency-penalty", type=click.FloatRange(-2, 2), default=0.0, show_default=True,
              help="discourage repeating tokens (helps tiny models end their answers)")
def ask(prompt: str, model: str | None, schema_file: Path | None, json_mode: bool, strict: bool,
        system: str | None, stream: bool, max_tokens: int | None, temperature: float, seed: int | None,
        frequency_penalty: float) -> None:
    """Answer PROMPT once with a local model (no server needed)."""
    from smolrun.engine import Engine

    if schema_file is not None and json_mode:
        raise click.UsageError("use either --schema or --json, not both")
    fmt = _load_format(schema_file, strict) if schema_file else ResponseFormat("json_object") if json_mode else None
    messages = ((Message("system", system),) if system else ()) + (Message("user", prompt),)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                            frequency_penalty=frequency_penalty)
    turn = Turn(messages, fmt or ResponseFormat(), params)
    engine = Engine.load(Settings.from_env(model=model))
    parts: list[str] = []
    done: Done | None = None
    for event in engine.generate(engine.prepare(turn)):
        if isinstance(event, TextDelta):
            parts.append(event.text)
            if stream:
                click.echo(event.text, nl=False)
        else:
            done = event
    text = "".join(parts)
    if stream:
        click.echo()
    elif fmt is not None and done is not None and done.finish_reason == "stop":
        click.echo(json.dumps(json.loads(text), indent=2, ensure_ascii=False))
    else:
        click.echo(text)
    if done is not None and done.finish_reason == "length":
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


@main.command(name="exec")
@click.argument("source", type=click.File("r", encoding="utf-8"))
@click.option("--file", "files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="copy this file into /mnt/data first (repeatable)")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True, help="seconds")
@click.option("--save-images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="write the PNG images the code produced into this directory")
def exec_(source: Any, files: tuple[Path, ...], timeout: float, save_images: Path | None) -> None:
    """Run Python from SOURCE (a file, or - for stdin) in a fresh sandboxed container.

    Exactly the sandbox and limits that model-written code gets. Prints the output, the last expression's
    value and any traceback; exits 1 when the code raised.
    """
    from smolrun.sandbox import Container, default_config

    code = source.read()
    container = Container(default_config(), preload=()).start()
    try:
        for path in files:
            container.put_file(path.name, path.read_bytes())
        result = container.run(code, timeout=timeout)
        click.echo(result.logs, nl=False)
        if result.result is not None:
            click.echo(result.result)
        for i, png in enumerate(result.images, 1):
            if save_images is not None:
                save_images.mkdir(parents=True, exist_ok=True)
                (save_images / f"image-{i}.png").write_bytes(png)
            click.echo(f"[image {i}: {len(png)} bytes PNG{' saved' if save_images else ''}]", err=True)
        if result.files:
            click.echo(f"[files written in /mnt/data: {', '.join(result.files)}]", err=True)
        if result.error is not None:
            click.echo(result.error.traceback or f"{result.error.name}: {result.error.value}", err=True)
            sys.exit(1)
    finally:
        container.close()


@main.command()
def models() -> None:
    """List registry models and GGUF files in the Hugging Face cache."""
    entries = list_models()
    width = max(len(e.name) for e in entries)
    for e in entries:
        click.echo(f"{e.name:<{width}}  {e.status:<15}  {e.description}")
