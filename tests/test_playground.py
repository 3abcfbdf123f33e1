"""The playground at `/` in a real Chromium (Debian's `chromium`, driven by Playwright for Python), against a real
server on the bundled model. Screenshots go to each test's temporary directory."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from smolrun.engine import Engine
from tests.api.test_files_containers import needs_sandbox
from tests.conftest import Server

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need Playwright (make test)")
CHROMIUM = os.environ.get("SMOLRUN_CHROMIUM") or shutil.which("chromium")
pytestmark = [pytest.mark.model, pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium here: `make test` installs Debian's chromium (or set SMOLRUN_CHROMIUM)")]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130},
                         "city": {"type": "string", "maxLength": 40}}}
TIMEOUT_MS = 240_000  # a generation on a loaded 2-core machine


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        # As root (CI, containers) Chromium refuses to start with its own sandbox.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        yield launched
        launched.close()


@pytest.fixture()
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert errors == []  # no script error on the page, whatever the test did


def open_playground(page: Any, server: Server) -> None:
    page.goto(server.url.removesuffix("/v1") + "/")
    page.wait_for_selector(f'#model option[value="{server.engine.name}"]', state="attached")
    page.fill("#temperature", "0")


def send(page: Any, text: str, answers: int = 1) -> None:
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_selector(f".message.assistant:nth-of-type({2 * answers}) .figures, .message.assistant .error",
                           timeout=TIMEOUT_MS)


def test_the_page_is_offline_and_asks_nothing_of_other_hosts(page: Any, server: Server) -> None:
    hosts: set[str] = set()
    page.on("request", lambda request: hosts.add(request.url.split("/")[2]))
    open_playground(page, server)
    assert hosts == {server.url.split("/")[2]}
    assert page.eval_on_selector_all("#capabilities .badge", "badges => badges.map(b => b.textContent)") == [
        "text only", "no thinking mode"]
    assert page.eval_on_selector_all("#model option", "options => options.map(o => o.value)") == [
        "auto", server.engine.name]


def test_a_schema_answer_is_shown_and_validated_in_the_page(page: Any, server: Server, tmp_path: Path) -> None:
    open_playground(page, server)
    page.check("#use-schema")
    page.select_option("#example", "person")
    send(page, "Describe a person as JSON.")
    page.screenshot(path=str(tmp_path / "schema.png"), full_page=True)
    assert page.inner_text(".verdict") == "✓ valid against the schema"
    jsonschema.validate(json.loads(page.inner_text("pre.json")), PERSON)  # what the page shows, checked again here
    figures = page.inner_text(".figures")
    assert "first token" in figures and "tokens/s" in figures and "cached" in figures


def test_an_invalid_schema_is_an_editor_error_and_a_refused_one_a_readable_message(page: Any,
                                                                                   server: Server) -> None:
    open_playground(page, server)
    page.check("#use-schema")
    page.fill("#schema", "{")
    assert page.inner_text("#schema-error").startswith("Not JSON:")
    refused = {"type": "object", "properties": {"a": {"not": {}}}, "required": ["a"], "additionalProperties": False}
    page.fill("#schema", json.dumps(refused))
    assert page.is_hidden("#schema-error")  # a valid JSON Schema, which smolrun cannot guarantee: the server says so
    send(page, "Anything.")
    expected = httpx.post(f"{server.url}/chat/completions", timeout=60, json={
        "model": server.engine.name, "messages": [{"role": "user", "content": "Anything."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": refused,
                                                                   "strict": True}}})
    assert expected.status_code == 400
    assert page.inner_text(".message.assistant .error") == expected.json()["error"]["message"]


def code_turn(page: Any, server: Server, data: Path, text: str) -> dict[str, Any]:
    """A first code-interpreter turn from the page, with `data` attached; the request it sent."""
    open_playground(page, server)
    page.check('input[name="mode"][value="code"]')
    page.check("#code-first")
    page.fill("#max-tokens", "300")
    page.set_input_files("#files", str(data))
    with page.expect_request(lambda r: r.url.endswith("/v1/responses")) as sent:
        send(page, text)
    body: dict[str, Any] = sent.value.post_data_json
    return body


@needs_sandbox
def test_code_cells_their_output_and_figures_appear_as_they_ran(page: Any, make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A scripted model: what the page shows is then known exactly (the bundled model's own code is the next test's).
    from tests.fakes import TurnsModel

    code = ("import matplotlib.pyplot as plt\nprint(open('data.csv').read().count('\\n'))\n"
            "line, = plt.plot([1, 4, 9, 16])")
    server = make_server(Engine(TurnsModel(f"```python\n{code}\n```".encode(), b"A rising line.")))
    data = tmp_path / "data.csv"
    data.write_text("x,y\n1,2\n2,4\n3,9\n4,16\n")
    body = code_turn(page, server, data, "Plot the data.")
    page.screenshot(path=str(tmp_path / "figure.png"), full_page=True)
    assert body["tool_choice"] == "required" and body["include"] == ["code_interpreter_call.outputs"]
    assert page.inner_text(".cell pre.code") == code
    assert page.inner_text(".cell .cell-head") == "python"
    assert page.inner_text(".cell pre.logs") == "5"
    assert page.get_attribute(".cell .outputs img", "src").startswith("data:image/png;base64,iVBORw0KGgo")
    assert page.inner_text(".message.assistant > .text") == "A rising line."


@needs_sandbox
def test_a_code_interpreter_turn_on_a_csv_then_a_follow_up_in_the_same_container(page: Any, server: Server,
                                                                                 tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text("x,y\n1,2\n2,4\n3,9\n4,16\n")
    body = code_turn(page, server, data, "Make a line plot of df.y against df.x, where df = pd.read_csv('data.csv').")
    page.screenshot(path=str(tmp_path / "code.png"), full_page=True)
    container = page.inner_text("#container-id")
    assert body["tools"] == [{"type": "code_interpreter", "container": container}]
    assert body["tool_choice"] == "required" and "previous_response_id" not in body
    # What the model wrote and what it ran to (a 135M model's code often fails): the page shows each call as
    # the stored response has it.
    with page.expect_request(lambda r: r.url.endswith("/v1/responses")) as second:
        page.uncheck("#code-first")
        send(page, "Now print df.y.sum().", answers=2)
    follow_up = second.value.post_data_json
    first_id = follow_up["previous_response_id"]
    stored = httpx.get(f"{server.url}/responses/{first_id}", timeout=30).json()
    calls = [o for o in stored["output"] if o["type"] == "code_interpreter_call"]
    first_answer = page.locator(".message.assistant").first
    assert first_answer.locator("pre.code").all_inner_texts() == [c["code"] for c in calls]
    assert calls  # tool_choice "required": the turn began with code
    # A call cut by the token budget never ran, so it names no container.
    assert [c["container_id"] for c in calls] == [container if c["status"] == "completed" else "" for c in calls]
    assert page.inner_text("#container-files").startswith("data.csv")
    with page.expect_download() as download:
        page.click("#container-files button")
    assert Path(download.value.path()).read_bytes() == data.read_bytes()  # fetched with the key, saved from memory
    page.screenshot(path=str(tmp_path / "follow-up.png"), full_page=True)
    assert follow_up["tools"] == [{"type": "code_interpreter", "container": container}]
    assert page.inner_text("#container-id") == container


def test_with_an_api_key_the_page_asks_for_it_and_keeps_it_for_the_session(page: Any, make_server,  # type: ignore[no-untyped-def]
                                                                           engine: Engine, tmp_path: Path) -> None:
    server = make_server(engine, api_key="sesame")
    page.goto(server.url.removesuffix("/v1") + "/")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key", "sesame")
    page.click("#key-save")
    page.wait_for_selector(f'#model option[value="{engine.name}"]', state="attached")
    assert page.evaluate("sessionStorage.getItem('smolrun-api-key')") == "sesame"
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "20")
    send(page, "Say hello.")
    page.screenshot(path=str(tmp_path / "api-key.png"), full_page=True)
    assert page.locator(".message.assistant .text").inner_text().strip()
    assert page.locator(".message.assistant .error").count() == 0


def test_copy_as_code_gives_a_curl_and_a_python_program_that_run(page: Any, server: Server) -> None:
    import subprocess
    import sys

    open_playground(page, server)
    page.fill("#max-tokens", "8")
    send(page, "Say hi.")
    page.click("#copy-python")
    program = page.inner_text("#code-text")
    page.click("#code-dialog button[value=close]")
    ran = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip()  # the streamed answer, printed as it came
    page.click("#copy-curl")
    command = page.inner_text("#code-text")
    assert command.startswith(f"curl -N {server.url}/chat/completions")
    curl = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert curl.returncode == 0 and curl.stdout.rstrip().endswith("data: [DONE]"), curl.stderr


def test_on_a_phone_with_the_keyboard_alone(browser: Any, server: Server, tmp_path: Path) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    phone = context.new_page()
    try:
        open_playground(phone, server)
        fits = phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert fits  # nothing wider than the screen
        phone.fill("#max-tokens", "8")
        phone.focus("#prompt")
        phone.keyboard.type("Hello")
        phone.keyboard.press("Control+Enter")  # sends without the mouse
        phone.wait_for_selector(".message.assistant .figures", timeout=TIMEOUT_MS)
        phone.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
        assert phone.inner_text(".message.user") == "Hello"
    finally:
        context.close()


def test_a_thinking_model_shows_its_reasoning_folded_with_its_token_count(page: Any, make_server,  # type: ignore[no-untyped-def]
                                                                          tiny_smollm3: Path) -> None:
    pytest.importorskip("transformers", reason="the tiny SmolLM3 runs on transformers: `make test` installs it")
    from smolrun.config import Settings

    thinker = Engine.load(Settings(backend="transformers", model=str(tiny_smollm3), threads=2, n_ctx=2048))
    server = make_server(thinker)
    open_playground(page, server)
    assert page.eval_on_selector_all("#capabilities .badge", "badges => badges.map(b => b.textContent)") == [
        "text only", "thinks"]
    page.fill("#max-tokens", "40")
    page.fill("#budget", "12")  # random weights: the grammar closes the thought at its budget
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        send(page, "Think first.")
    assert sent.value.post_data_json["thinking_token_budget"] == 12
    summary = page.inner_text(".reasoning summary")
    tokens = int(summary.removeprefix("Reasoning (").removesuffix(" tokens)"))
    assert 0 < tokens <= 12 + 2  # the budget, and the two tags the count includes
    assert page.eval_on_selector(".reasoning", "details => details.open") is False  # folded until opened
    assert page.eval_on_selector(".reasoning .thoughts", "node => node.textContent.length") > 0
