"""Reaching vLLM: attach to running servers or launch one as a child process, then check that each one
tokenizes as smolrun does and enforces smolrun's grammars (backends/vllm.py decodes through them)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from smolrun.backends.decode import SequenceState
from smolrun.backends.tokenizer import HFTokenizer
from smolrun.backends.transformers import HFSource, hf_source
from smolrun.backends.vllm import GUIDANCE, Replicas, VllmModel, _httpx, completion_body
from smolrun.config import Settings
from smolrun.errors import BackendMissing, GenerationFailed, ModelUnavailable, first_line
from smolrun.models import REGISTRY, hub_offline
from smolrun.turn import SamplingParams

# Where `make vllm` installs vLLM, in a virtual environment of its own (its pins conflict with smolrun's).
DEFAULT_VLLM_PYTHON = ("/opt/smolrun/vllm-env/bin/python" if os.geteuid() == 0
                       else str(Path.home() / ".local/share/smolrun/vllm-env/bin/python"))
START_TIMEOUT_S = 900.0


def connect(settings: Settings, name: str) -> VllmModel:
    """The vLLM engine for `name`: the servers at settings.vllm_urls, or one launched here; checked."""
    launched: VllmServer | None = None
    if settings.vllm_urls:
        source = hf_source(name, offline=settings.offline)
        urls = settings.vllm_urls
    else:
        location = model_location(name, settings)
        source = HFSource(_public_name(name), location)
        launched = VllmServer(location, source.name, settings)
        urls = (launched.start(),)
    try:
        text = load_tokenizer(source, offline=hub_offline(settings.offline))
        replicas = Replicas(urls)
        served, n_ctx = _served_model(replicas, settings.n_ctx)
        model = VllmModel(text, source.name, served, n_ctx, replicas,
                          on_close=launched.stop if launched is not None else None)
        check(model)
    except BaseException:
        if launched is not None:
            launched.stop()
        raise
    return model


def _public_name(name: str) -> str:
    path = Path(name).expanduser()
    return path.name if name not in REGISTRY and path.is_dir() else name


def model_location(name: str, settings: Settings) -> str:
    """What `vllm serve` loads for `name`: a directory or Hub id as given; a GGUF model (vLLM cannot load
    this kind) converted once to a safetensors directory under the data directory."""
    spec = REGISTRY.get(name)
    if spec is not None and spec.hf_model:
        return spec.hf_model
    path = Path(name).expanduser()
    if spec is None and path.is_dir():
        return str(path.resolve())
    if spec is None and not name.endswith(".gguf") and ":" not in name:
        return name  # a Hub id: vLLM downloads it where the Hub is reachable
    source = hf_source(name, offline=settings.offline)
    out = settings.data_dir / "vllm-models" / source.name.replace("/", "--").removesuffix(".gguf")
    if not (out / "config.json").is_file():
        assert source.gguf_file is not None
        export_hf(Path(source.location) / source.gguf_file, out)
    return str(out)


def export_hf(gguf: Path, out: Path) -> Path:
    """Convert a GGUF model to a Hugging Face safetensors directory (dequantised to float32) with transformers."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise BackendMissing("converting a GGUF model for vLLM needs transformers: "
                             "pip install 'smolrun[transformers]'") from exc
    print(f"smolrun: converting {gguf.name} to safetensors for vLLM, once, into {out} ...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantised, which makes save_pretrained refuse it.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def load_tokenizer(source: HFSource, offline: bool) -> HFTokenizer:
    """The model's own tokenizer and chat template, without its weights."""
    try:
        import transformers
    except ImportError as exc:
        raise BackendMissing("the vLLM engine needs transformers for the model's tokenizer: "
                             "pip install 'smolrun[vllm]'") from exc
    extra: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = transformers.AutoConfig.from_pretrained(source.location, local_files_only=offline, **extra)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.location, local_files_only=offline, **extra)
        try:
            generation = transformers.GenerationConfig.from_pretrained(source.location, local_files_only=offline,
                                                                       **extra)
            eos = getattr(generation, "eos_token_id", None)
        except OSError:
            eos = None
    except OSError as exc:
        reason = first_line(exc)
        raise ModelUnavailable(f"could not load the tokenizer of {source.location!r} ({reason.rstrip('.')}); the "
                               "vLLM engine needs the served model's own tokenizer here too") from exc
    n_vocab = int(config.get_text_config().vocab_size)
    template = tokenizer.chat_template
    return HFTokenizer(tokenizer, max(n_vocab, len(tokenizer)), [eos], template if isinstance(template, str) else None)


def _served_model(replicas: Replicas, n_ctx: int) -> tuple[str, int]:
    """The model id every replica serves and the context they all allow (at most n_ctx)."""
    httpx = _httpx()
    seen: dict[str, tuple[str, int]] = {}
    for replica in replicas.all:
        try:
            reply = httpx.get(f"{replica.url}/v1/models", timeout=10)
            reply.raise_for_status()
            models = reply.json()["data"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise ModelUnavailable(f"the vLLM server at {replica.url} does not answer /v1/models ({exc})") from exc
        if len(models) != 1:
            raise ModelUnavailable(f"the vLLM server at {replica.url} serves {len(models)} models; smolrun needs "
                                   "one model per server")
        seen[replica.url] = (str(models[0]["id"]), int(models[0].get("max_model_len") or n_ctx))
    ids = {served for served, _ in seen.values()}
    if len(ids) > 1:
        raise ModelUnavailable(f"the vLLM servers serve different models: {json.dumps(seen)}; replicas must "
                               "serve the same one")
    return ids.pop(), min([n_ctx, *(limit for _, limit in seen.values())])


def check(model: VllmModel) -> None:
    """Refuse a server that tokenizes otherwise than the local tokenizer, or that does not enforce a grammar
    (vLLM's default `auto` backend hands Lark to xgrammar, which ignores token references)."""
    httpx = _httpx()
    tags = [t for t in (model.bos_token, model.eos_token) if t]
    probe = f"{tags[0] if tags else ''}Hello, wörld! 東京 1+1=2\n\t<b>{tags[-1] if tags else ''}"
    expected = model.tokenize(probe)
    special = next((t for t in sorted(model.lltokenizer.tokenize_str(probe, parse_special=True))
                    if model.lltokenizer.is_special_token(t) and t not in model.eog_tokens), None)
    middle = f' <[{special}]> " "' if special is not None else ""
    end = min(model.eog_tokens)
    grammar = f'start: "smolrun probe" {middle} /[0-9]{{2}}/ <[{end}]>\n'
    prompt = model.tokenize(f"{model.bos_token}Say something.")
    for replica in model.replicas.all:
        try:
            reply = httpx.post(f"{replica.url}/tokenize", timeout=30,
                               json={"model": model.served, "prompt": probe, "add_special_tokens": False})
            reply.raise_for_status()
            remote = reply.json()["tokens"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise ModelUnavailable(f"the vLLM server at {replica.url} does not answer /tokenize ({exc})") from exc
        if remote != expected:
            raise ModelUnavailable(f"the vLLM server at {replica.url} tokenizes otherwise than the local tokenizer "
                                   f"of {model.name} ({remote[:12]} against {expected[:12]}): it serves another "
                                   "model or revision")
        _probe_grammar(model, replica.url, prompt, grammar)


def _probe_grammar(model: VllmModel, url: str, prompt: list[int], grammar: str) -> None:
    from llguidance import LLMatcher

    httpx = _httpx()
    params = SamplingParams(max_tokens=24, temperature=0.0)
    state = SequenceState(len(prompt), model.n_ctx, params, LLMatcher(model.lltokenizer, grammar, log_level=0),
                          model.eog_tokens, model.token_bytes)
    body = completion_body(model, prompt, grammar, params, 24)
    refused = (f"the vLLM server at {url} does not enforce smolrun's grammars; start it with "
               f"--structured-outputs-config '{GUIDANCE}'")
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            if response.status_code != 200:
                raise ModelUnavailable(f"{refused} (the probe got HTTP {response.status_code}: "
                                       f"{response.read()[:300]!r})")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:  # a grammar backend that gives up, or an engine that died: its log says which
                    raise ModelUnavailable(f"the vLLM server at {url} failed smolrun's grammar probe "
                                           f"({chunk['error']}): its engine failed (its log says why), or it does "
                                           f"not enforce smolrun's grammars (--structured-outputs-config "
                                           f"'{GUIDANCE}')")
                for choice in chunk.get("choices") or ():
                    for token in choice.get("token_ids") or ():
                        if not state.done:
                            state.replay(int(token))
    except GenerationFailed as exc:
        raise ModelUnavailable(f"{refused} ({exc.message})") from exc
    except httpx.HTTPError as exc:
        raise ModelUnavailable(f"the vLLM server at {url} failed the grammar probe ({exc})") from exc
    if not (state.done and state.reason == "stop" and state.matcher is not None and state.matcher.is_stopped()):
        raise ModelUnavailable(f"{refused} (the probe's answer did not complete its grammar)")


class VllmServer:
    """A `vllm serve` child process for this machine's GPUs (or its CPU with vLLM's CPU build), stopped with
    smolrun (and by the kernel, should smolrun die first)."""

    def __init__(self, location: str, served: str, settings: Settings) -> None:
        self.location = location
        self.served = served
        self.settings = settings
        self.python = settings.vllm_python or os.environ.get("SMOLRUN_VLLM_PYTHON") or DEFAULT_VLLM_PYTHON
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = settings.data_dir / "logs" / f"vllm-{os.getpid()}.log"

    def command(self, port: int) -> list[str]:
        # The module entry point, not the `vllm` script: the CPU build's script looks up a dist named `vllm`.
        args = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.location,
                "--served-model-name", self.served, "--host", "127.0.0.1", "--port", str(port),
                "--max-model-len", str(self.settings.n_ctx), "--structured-outputs-config", GUIDANCE,
                "--enable-prompt-tokens-details", "--generation-config", "vllm"]
        if not _has_gpu():
            args += ["--dtype", "float32", "--enforce-eager"]  # vLLM's CPU build: no bf16 kernels, no graphs
        return args + list(self.settings.vllm_args)

    def start(self) -> str:
        if not Path(self.python).exists() and shutil.which(self.python) is None:
            raise BackendMissing(f"vLLM is not installed at {self.python}: run `make vllm`, or point "
                                 "SMOLRUN_VLLM_PYTHON (--vllm-python) at a Python with vLLM, or attach to running "
                                 "servers with --vllm-url")
        port = _free_port()
        command = self.command(port)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        print(f"smolrun: starting vLLM on {self.location} (log: {self.log_path}): {shlex.join(command)}",
              file=sys.stderr)
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        url = f"http://127.0.0.1:{port}"
        self._wait_ready(url, sys.stderr)
        return url

    def _wait_ready(self, url: str, progress: TextIO) -> None:
        httpx = _httpx()
        assert self.process is not None
        started = last = time.monotonic()
        while True:
            code = self.process.poll()
            if code is not None:
                tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
                self.process = None
                raise ModelUnavailable(f"vLLM exited with code {code} while starting; the end of {self.log_path}:\n"
                                       + "\n".join(tail))
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    print(f"smolrun: vLLM is ready ({time.monotonic() - started:.0f} s)", file=progress)
                    return
            except httpx.HTTPError:
                pass
            now = time.monotonic()
            if now - started > START_TIMEOUT_S:
                self.stop()
                raise ModelUnavailable(f"vLLM did not start within {START_TIMEOUT_S:.0f} s; see {self.log_path}")
            if now - last >= 15:
                print(f"smolrun: vLLM is still starting ({now - started:.0f} s)", file=progress)
                last = now
            time.sleep(0.5)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _die_with_parent() -> None:
    """In the child: SIGTERM when smolrun dies, however it dies (Linux's PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
