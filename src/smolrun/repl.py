"""`smolrun chat`: an interactive conversation with a local model or a running server, with history and commands."""

from __future__ import annotations

import base64
import json
import mimetypes
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from smolrun.errors import InvalidRequest, SmolrunError

HELP = """Commands:
  /reset         forget the conversation (the system message stays)
  /schema FILE   answer as JSON valid against the JSON Schema in FILE; /schema off: free text again
  /file PATH     attach a file to your next message (text is inlined; pictures and PDFs for a vision model)
  /thoughts      show the last answer's thinking in full
  /bye           leave (Ctrl+D too); Ctrl+C stops an answer, not the program"""
MAX_TEXT_FILE = 1 << 20  # bytes of a text file inlined into a message
PICTURES = {"image/png", "image/jpeg", "image/gif", "image/webp"}


@dataclass(frozen=True)
class Reply:
    text: str
    reasoning: str
    finish_reason: str  # "stop", "length", or "stopped" (Ctrl+C)


class Talker(Protocol):
    """Where answers come from: a model loaded here, or a server."""

    name: str

    def stream(self, messages: list[dict[str, Any]], response_format: dict[str, Any] | None,
               options: dict[str, Any]) -> Iterator[tuple[str, str]]:
        """("text" | "reasoning" | "finish", piece) pairs as the answer is generated; closing the iterator stops
        the generation."""
        ...


class LocalTalker:
    """A model loaded in this process, through the same request checks as the server's."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.name: str = engine.name

    def stream(self, messages: list[dict[str, Any]], response_format: dict[str, Any] | None,
               options: dict[str, Any]) -> Iterator[tuple[str, str]]:
        from smolrun.api.wire import ChatCompletionRequest
        from smolrun.turn import Done, ReasoningDelta, TextDelta

        body = {"model": self.name, "messages": messages, **options,
                **({"response_format": response_format} if response_format else {})}
        try:
            turn = ChatCompletionRequest.model_validate(body).to_turn()
        except ValueError as exc:  # pydantic's ValidationError: a bad option or schema
            raise InvalidRequest(str(exc).splitlines()[0]) from None
        events = self.engine.generate(self.engine.prepare(turn))
        try:
            for event in events:
                if isinstance(event, TextDelta):
                    yield "text", event.text
                elif isinstance(event, ReasoningDelta):
                    yield "reasoning", event.text
                elif isinstance(event, Done):
                    yield "finish", event.finish_reason
        finally:
            events.close()  # a stopped answer: the engine cancels its generation


class RemoteTalker:
    """A running smolrun (or any OpenAI-compatible server), through streamed Chat Completions."""

    def __init__(self, url: str, api_key: str | None, model: str | None) -> None:
        self.url = url.rstrip("/").removesuffix("/v1") + "/v1"
        self.api_key = api_key
        self.name = model or self._first_model()

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json",
                   **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})}
        request = urllib.request.Request(f"{self.url}{path}", headers=headers, method="POST" if body else "GET",
                                         data=json.dumps(body).encode() if body else None)
        try:
            return urllib.request.urlopen(request, timeout=600)
        except urllib.error.HTTPError as exc:
            try:
                message = json.load(exc).get("error", {}).get("message", exc.reason)
            except ValueError:
                message = exc.reason
            raise InvalidRequest(f"the server answered {exc.code}: {message}") from None
        except OSError as exc:
            raise InvalidRequest(f"cannot reach {self.url}: {exc}") from None

    def _first_model(self) -> str:
        with self._request("/models") as response:
            models = json.load(response).get("data") or []
        if not models:
            raise InvalidRequest(f"{self.url} serves no model")
        return str(models[0]["id"])

    def stream(self, messages: list[dict[str, Any]], response_format: dict[str, Any] | None,
               options: dict[str, Any]) -> Iterator[tuple[str, str]]:
        body = {"model": self.name, "messages": messages, "stream": True, **options,
                **({"response_format": response_format} if response_format else {})}
        with self._request("/chat/completions", body) as response:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise InvalidRequest(chunk["error"].get("message", "the server failed"))
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("reasoning_content"):
                        yield "reasoning", delta["reasoning_content"]
                    if delta.get("content"):
                        yield "text", delta["content"]
                    if choice.get("finish_reason"):
                        yield "finish", choice["finish_reason"]


@dataclass
class Conversation:
    """The REPL's state: history, the answer format, the file waiting for the next message."""

    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    response_format: dict[str, Any] | None = None
    attached: list[dict[str, Any]] = field(default_factory=list)
    last_reasoning: str = ""

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.attached = []
        self.last_reasoning = ""


def attachment(path: Path) -> dict[str, Any]:
    """A content part for `path`: a picture or PDF as a data URL, anything else as its text."""
    if not path.is_file():
        raise InvalidRequest(f"no file at {path}")
    kind = mimetypes.guess_type(path.name)[0] or ""
    if kind in PICTURES or kind == "application/pdf":
        url = f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"
        if kind == "application/pdf":
            return {"type": "file", "file": {"file_data": url, "filename": path.name}}
        return {"type": "image_url", "image_url": {"url": url}}
    data = path.read_bytes()
    if len(data) > MAX_TEXT_FILE:
        raise InvalidRequest(f"{path} is larger than {MAX_TEXT_FILE >> 20} MiB; attach a smaller text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{path} is neither text (UTF-8) nor a picture or PDF") from None
    return {"type": "text", "text": f"File {path.name}:\n```\n{text}\n```"}


def schema_format(path: Path) -> dict[str, Any]:
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidRequest(f"cannot read schema file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InvalidRequest(f"schema file {path} is not valid JSON: {exc}") from None
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in path.stem)[:64] or "schema"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


class Repl:
    """Reads lines, runs commands, streams answers; Ctrl+C stops an answer, Ctrl+D or /bye leaves."""

    def __init__(self, talker: Talker, conversation: Conversation, options: dict[str, Any],
                 read: Callable[[str], str] = input, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.talker = talker
        self.conversation = conversation
        self.options = options
        self.read = read
        self.out = out
        self.err = err

    def say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def run(self) -> None:
        self.say(f"smolrun chat with {self.talker.name}: /help for commands, /bye or Ctrl+D to leave")
        self.conversation.reset()
        while True:
            try:
                line = self.read(">>> ")
            except EOFError:
                self.say("")
                return
            except KeyboardInterrupt:  # at the prompt: nothing to stop
                self.say("\nUse Ctrl+D or /bye to leave.")
                continue
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line.strip()):
                    return
                continue
            self.answer(line)

    def command(self, line: str) -> bool:
        """Run one command; False to leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        c = self.conversation
        try:
            if name in ("/bye", "/exit", "/quit"):
                return False
            if name == "/help":
                self.say(HELP)
            elif name == "/reset":
                c.reset()
                self.say("(the conversation starts over)")
            elif name == "/schema" and arg == "off":
                c.response_format = None
                self.say("(answers are free text again)")
            elif name == "/schema" and arg:
                c.response_format = schema_format(Path(arg).expanduser())
                self.say(f"(answers are JSON valid against {arg})")
            elif name == "/file" and arg:
                c.attached.append(attachment(Path(arg).expanduser()))
                self.say(f"({arg} goes with your next message)")
            elif name == "/thoughts":
                self.say(c.last_reasoning or "(the last answer had no thinking)")
            else:
                self.say(f"unknown command {line!r}\n{HELP}")
        except SmolrunError as exc:
            self.say(f"smolrun: error: {exc.message}")
        return True

    def answer(self, line: str) -> None:
        c = self.conversation
        content: str | list[dict[str, Any]] = [*c.attached, {"type": "text", "text": line}] if c.attached else line
        messages = [*c.messages, {"role": "user", "content": content}]
        text: list[str] = []
        thoughts = _Thoughts(self.err)
        finish = "stop"
        stream = self.talker.stream(messages, c.response_format, self.options)
        try:
            for kind, piece in stream:
                if kind == "reasoning":
                    thoughts.add(piece)
                elif kind == "text":
                    thoughts.fold()
                    text.append(piece)
                    print(piece, end="", file=self.out, flush=True)
                else:
                    finish = piece
        except KeyboardInterrupt:
            finish = "stopped"
        except SmolrunError as exc:
            thoughts.fold()
            if text:
                print(file=self.out, flush=True)
            self.say(f"smolrun: error: {exc.message}")
            return  # nothing was said: the message is not kept either
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        thoughts.fold()
        print(file=self.out, flush=True)
        if finish == "stopped":
            self.say("(stopped)")
        elif finish == "length":
            self.say("(cut at the token limit: --max-tokens)")
        c.messages = [*messages, {"role": "assistant", "content": "".join(text)}]
        c.attached = []
        c.last_reasoning = thoughts.text


class _Thoughts:
    """A thinking model's thoughts, folded into one line that counts them; /thoughts shows them in full."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.parts: list[str] = []
        self.shown = 0.0
        self.folded = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, piece: str) -> None:
        self.parts.append(piece)
        now = time.monotonic()
        if now - self.shown > 0.2:
            self.shown = now
            self.err.write(f"\r\033[2mthinking… {len(self.text.split())} words\033[0m")
            self.err.flush()

    def fold(self) -> None:
        if self.parts and not self.folded:
            self.folded = True
            self.err.write(f"\r\033[2m[thought {len(self.text.split())} words: /thoughts shows them]\033[0m\n")
            self.err.flush()


def main(talker: Talker, system: str | None, options: dict[str, Any]) -> None:
    """Run the REPL on this (the main) thread: only it receives Ctrl+C."""
    try:
        import readline  # noqa: F401  # arrow keys and history for input()
    except ImportError:
        pass
    Repl(talker, Conversation(system), options).run()
