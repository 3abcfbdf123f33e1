// The smolrun playground. It talks to the server only through the public API under /v1, as any client
// does: Chat Completions for chat, the Responses API (with a container) for the code interpreter.

const $ = (selector) => document.querySelector(selector);

const EXAMPLES = {
  person: {
    type: "object", additionalProperties: false, required: ["name", "age", "city"],
    properties: {
      name: { type: "string", maxLength: 40 },
      age: { type: "integer", minimum: 0, maximum: 130 },
      city: { type: "string", maxLength: 40 },
    },
  },
  invoice: {
    type: "object", additionalProperties: false, required: ["number", "date", "total", "currency", "lines"],
    properties: {
      number: { type: "string", maxLength: 20 },
      date: { type: "string", format: "date" },
      total: { type: "number", minimum: 0 },
      currency: { type: "string", enum: ["EUR", "USD", "GBP"] },
      lines: {
        type: "array", maxItems: 10,
        items: {
          type: "object", additionalProperties: false, required: ["item", "amount"],
          properties: { item: { type: "string", maxLength: 40 }, amount: { type: "number" } },
        },
      },
    },
  },
  table: {
    type: "object", additionalProperties: false, required: ["rows", "columns", "summary"],
    properties: {
      rows: { type: "integer", minimum: 0 },
      columns: { type: "array", items: { type: "string", maxLength: 30 }, maxItems: 20 },
      summary: { type: "string", maxLength: 300 },
    },
  },
};

const state = {
  key: sessionStorage.getItem("smolrun-api-key") || "",
  models: [],
  chat: [],  // the Chat Completions conversation so far
  previousId: null,  // the last Responses id, for previous_response_id
  container: null,  // the code interpreter's container, created at the first code turn
  attachments: [],  // files picked or dropped for the next message
  lastRequest: null,  // {path, body} of the last request sent, for "copy as code"
  busy: false,
};

class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

// -- HTTP ------------------------------------------------------------------------------------------------

function headers(extra = {}) {
  return state.key ? { ...extra, Authorization: `Bearer ${state.key}` } : extra;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      param = body.error.param || null;
    }
  } catch (_) { /* not JSON: the status line says it */ }
  return new ApiError(response.status, message, param);
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (!response.ok) {
    const error = await failure(response);
    if (response.status === 401) askForKey(error.message);
    throw error;
  }
  return response;
}

async function postJson(path, body) {
  return api(path, { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
}

// Server-sent events: yields each `data:` payload parsed, until [DONE] or the end of the body.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// -- the page's parts ------------------------------------------------------------------------------------

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function selectedModel() {
  return state.models.find((m) => m.id === $("#model").value);
}

function showCapabilities() {
  const model = selectedModel();
  const badges = $("#capabilities");
  badges.replaceChildren();
  if (!model) {  // auto: the vision model for pictures, the text model otherwise
    const sees = state.models.some((m) => m.capabilities && m.capabilities.vision);
    badges.append(element("span", { class: "badge", text: sees ? "routes pictures to the vision model" : "text" }));
    $("#reasoning-settings").disabled = false;
    return;
  }
  const caps = model.capabilities || {};
  badges.append(element("span", { class: "badge", text: caps.vision ? "sees images" : "text only" }));
  badges.append(element("span", { class: "badge", text: caps.reasoning ? "thinks" : "no thinking mode" }));
  $("#reasoning-settings").disabled = !caps.reasoning;
}

async function loadModels() {
  try {
    const list = await (await api("/v1/models")).json();
    state.models = list.data;
    const select = $("#model");
    select.replaceChildren(element("option", { value: "auto", text: "auto" }),
      ...list.data.map((m) => element("option", { value: m.id, text: m.id })));
    select.value = list.data[0] ? list.data[0].id : "auto";
    showCapabilities();
  } catch (error) {
    if (error.status !== 401) notice(`Could not list the models: ${error.message}`);
  }
}

function askForKey(reason) {
  const dialog = $("#key-dialog");
  if (dialog.open) return;
  $("#key").value = state.key;
  dialog.querySelector("p").textContent = reason
    ? `${reason} The key stays in this tab's session storage.`
    : "The server's API key (--api-key). It stays in this tab's session storage.";
  dialog.showModal();
}

function notice(message) {
  const node = element("div", { class: "message error", role: "alert", text: message });
  $("#conversation").append(node);
  node.scrollIntoView({ block: "end" });
}

// -- the schema editor -----------------------------------------------------------------------------------

function validator(schema) {
  // A fresh Ajv each time: it would otherwise keep every schema typed into the editor.
  const Ajv = window.ajv2020.default || window.ajv2020;
  const copy = { ...schema };
  delete copy.$schema;  // any draft: the 2020-12 validator reads the keywords smolrun accepts
  return new Ajv({ strict: false, allErrors: true, validateFormats: false }).compile(copy);
}

// The schema in the editor, checked: {schema, validate} or {error}.
function editedSchema() {
  let schema;
  try {
    schema = JSON.parse($("#schema").value);
  } catch (error) {
    return { error: `Not JSON: ${error.message}` };
  }
  if (typeof schema !== "object" || schema === null || Array.isArray(schema)) {
    return { error: "A JSON Schema is an object." };
  }
  try {
    return { schema, validate: validator(schema) };
  } catch (error) {
    return { error: `Not a valid JSON Schema: ${error.message}` };
  }
}

function checkSchemaEditor() {
  const problem = $("#schema-error");
  const checked = editedSchema();
  problem.hidden = !checked.error;
  problem.textContent = checked.error || "";
  $("#schema").setAttribute("aria-invalid", checked.error ? "true" : "false");
  return checked;
}

function loadExample() {
  $("#schema").value = JSON.stringify(EXAMPLES[$("#example").value], null, 2);
  checkSchemaEditor();
}

// -- attachments -----------------------------------------------------------------------------------------

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function addFiles(files) {
  state.attachments.push(...files);
  showAttachments();
}

function showAttachments() {
  const list = $("#attachments");
  list.replaceChildren(...state.attachments.map((file, i) => {
    const remove = element("button", { type: "button", "aria-label": `Remove ${file.name}`, text: "×" });
    remove.addEventListener("click", () => { state.attachments.splice(i, 1); showAttachments(); });
    return element("span", { class: "attachment" }, file.name, remove);
  }));
}

// -- a turn in the conversation --------------------------------------------------------------------------

function bubble(role, text) {
  const node = element("div", { class: `message ${role}` });
  if (text) node.append(element("div", { class: "text", text }));
  $("#conversation").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

// An assistant turn as it streams: its reasoning, code cells, answer and figures.
class Answer {
  constructor() {
    this.node = bubble("assistant");
    this.started = performance.now();
    this.firstToken = null;
    this.reasoning = null;
    this.text = null;
    this.cells = new Map();
  }

  mark() {
    if (this.firstToken === null) this.firstToken = performance.now();
  }

  think(delta) {
    this.mark();
    if (this.reasoning === null) {
      this.reasoning = element("details", { class: "reasoning" },
        element("summary", { text: "Reasoning" }), element("div", { class: "thoughts" }));
      this.node.append(this.reasoning);
    }
    this.reasoning.querySelector(".thoughts").textContent += delta;
  }

  write(delta) {
    this.mark();
    if (this.text === null) {
      this.text = element("div", { class: "text" });
      this.node.append(this.text);
    }
    this.text.textContent += delta;
    this.node.scrollIntoView({ block: "end" });
  }

  cell(id) {
    if (!this.cells.has(id)) {
      const cell = element("div", { class: "cell" }, element("div", { class: "cell-head", text: "python" }),
        element("pre", { class: "code" }, element("code")), element("div", { class: "outputs" }));
      this.cells.set(id, cell);
      this.node.append(cell);
    }
    return this.cells.get(id);
  }

  code(id, delta) {
    this.mark();
    this.cell(id).querySelector("code").textContent += delta;
  }

  running(id) {
    this.cell(id).querySelector(".cell-head").textContent = "python · running…";
  }

  ran(item) {
    const cell = this.cell(item.id);
    cell.querySelector("code").textContent = item.code;
    cell.querySelector(".cell-head").textContent = item.status === "completed" ? "python" : `python · ${item.status}`;
    const outputs = cell.querySelector(".outputs");
    outputs.replaceChildren();
    for (const output of item.outputs || []) {
      if (output.type === "logs" && output.logs) {
        const failed = /Traceback|Error:/.test(output.logs);
        outputs.append(element("pre", { class: failed ? "logs failed" : "logs", text: output.logs }));
      } else if (output.type === "image") {
        outputs.append(element("img", { src: output.url, alt: "A figure the code drew" }));
      }
    }
  }

  // The final text, typed when a schema was asked for: pretty-printed and checked in the page.
  typed(text, validate) {
    if (this.text === null) this.write("");
    let value;
    try {
      value = JSON.parse(text);
    } catch (error) {
      this.node.append(element("p", { class: "verdict invalid", text: `Not JSON: ${error.message}` }));
      return;
    }
    this.text.replaceChildren(element("pre", { class: "json", text: JSON.stringify(value, null, 2) }));
    const valid = validate(value);
    const verdict = valid ? "✓ valid against the schema"
      : `✗ not valid: ${validate.errors.map((e) => `${e.instancePath || "/"} ${e.message}`).join("; ")}`;
    this.node.append(element("p", { class: `verdict ${valid ? "valid" : "invalid"}`, text: verdict }));
  }

  finish(usage, cut) {
    const ended = performance.now();
    const out = usage ? (usage.completion_tokens ?? usage.output_tokens ?? 0) : 0;
    const details = usage ? (usage.prompt_tokens_details || usage.input_tokens_details || {}) : {};
    const thinking = usage ? ((usage.completion_tokens_details || usage.output_tokens_details || {}).reasoning_tokens || 0) : 0;
    const decoding = this.firstToken === null ? 0 : (ended - this.firstToken) / 1000;
    const figures = [
      this.firstToken === null ? null : `first token ${Math.round(this.firstToken - this.started)} ms`,
      decoding > 0 ? `${(out / decoding).toFixed(1)} tokens/s` : null,
      `${out} tokens`,
      `${details.cached_tokens || 0} cached`,
      cut ? "cut at the token limit" : null,
    ].filter(Boolean);
    if (this.reasoning !== null) {
      this.reasoning.querySelector("summary").textContent = `Reasoning (${thinking} tokens)`;
    }
    this.node.append(element("p", { class: "figures", text: figures.join(" · ") }));
  }

  fail(error) {
    this.node.append(element("p", { class: "error", role: "alert", text: error.message }));
    error.shown = true;
  }
}

// -- Chat Completions ------------------------------------------------------------------------------------

function sampling() {
  return {
    temperature: Number($("#temperature").value),
    max: Number($("#max-tokens").value) || undefined,
    effort: $("#effort").value || undefined,
    budget: Number($("#budget").value) || undefined,
  };
}

async function chatContent(text) {
  if (state.attachments.length === 0) return text;
  const parts = [{ type: "text", text }];
  for (const file of state.attachments) {
    const url = await readAsDataUrl(file);
    if (file.type.startsWith("image/")) parts.push({ type: "image_url", image_url: { url } });
    else parts.push({ type: "file", file: { file_data: url, filename: file.name } });
  }
  return parts;
}

async function sendChat(text, schema) {
  const s = sampling();
  const message = { role: "user", content: await chatContent(text) };
  const body = {
    model: $("#model").value, messages: [...state.chat, message], stream: true,
    stream_options: { include_usage: true }, temperature: s.temperature, max_tokens: s.max,
  };
  if (s.effort) body.reasoning_effort = s.effort;
  if (s.budget) body.thinking_token_budget = s.budget;
  if (schema) body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: schema.schema, strict: true } };
  state.lastRequest = { path: "/v1/chat/completions", body };
  bubble("user", text);
  const answer = new Answer();
  const response = await postJson("/v1/chat/completions", body).catch((error) => {
    answer.fail(error);
    throw error;
  });
  let content = "";
  let usage = null;
  let finish = null;
  for await (const chunk of events(response)) {
    if (chunk.error) throw Object.assign(new ApiError(500, chunk.error.message), { answer });
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      const delta = choice.delta || {};
      if (delta.reasoning_content) answer.think(delta.reasoning_content);
      if (delta.content) {
        content += delta.content;
        answer.write(delta.content);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  }
  if (schema && finish === "stop") answer.typed(content, schema.validate);
  answer.finish(usage, finish === "length");
  state.chat.push(message, { role: "assistant", content });
}

// -- the Responses API with the code interpreter ---------------------------------------------------------

async function ensureContainer() {
  if (state.container) return state.container;
  const container = await (await postJson("/v1/containers", { name: "playground" })).json();
  state.container = container.id;
  $("#container-panel").hidden = false;
  $("#container-id").textContent = container.id;
  return state.container;
}

async function uploadFiles() {
  const ids = [];
  for (const file of state.attachments) {
    const form = new FormData();
    form.append("purpose", "user_data");
    form.append("file", file, file.name);
    const uploaded = await (await api("/v1/files", { method: "POST", body: form })).json();
    ids.push(uploaded.id);
  }
  return ids;
}

async function sendResponses(text, schema) {
  const s = sampling();
  const container = await ensureContainer();
  const fileIds = await uploadFiles();
  const content = [{ type: "input_text", text }, ...fileIds.map((id) => ({ type: "input_file", file_id: id }))];
  const body = {
    model: $("#model").value, input: [{ role: "user", content }], stream: true,
    tools: [{ type: "code_interpreter", container }], include: ["code_interpreter_call.outputs"],
    temperature: s.temperature, max_output_tokens: s.max,
  };
  if ($("#code-first").checked) body.tool_choice = "required";
  if (state.previousId) body.previous_response_id = state.previousId;
  if (s.effort) body.reasoning = { effort: s.effort };
  if (s.budget) body.thinking_token_budget = s.budget;
  if (schema) body.text = { format: { type: "json_schema", name: "answer", schema: schema.schema, strict: true } };
  state.lastRequest = { path: "/v1/responses", body };
  bubble("user", text + (fileIds.length ? `\n[${state.attachments.map((f) => f.name).join(", ")}]` : ""));
  const answer = new Answer();
  const response = await postJson("/v1/responses", body).catch((error) => {
    answer.fail(error);
    throw error;
  });
  for await (const event of events(response)) {
    switch (event.type) {
      case "response.reasoning_text.delta": answer.think(event.delta); break;
      case "response.output_item.added":
        if (event.item.type === "code_interpreter_call") answer.cell(event.item.id);
        break;
      case "response.code_interpreter_call_code.delta": answer.code(event.item_id, event.delta); break;
      case "response.code_interpreter_call.interpreting": answer.running(event.item_id); break;
      case "response.output_item.done":
        if (event.item.type === "code_interpreter_call") answer.ran(event.item);
        break;
      case "response.output_text.delta": answer.write(event.delta); break;
      case "response.completed":
      case "response.incomplete": {
        const result = event.response;
        state.previousId = result.id;
        const message = result.output.filter((o) => o.type === "message").pop();
        if (schema && message && result.status === "completed") answer.typed(message.content[0].text, schema.validate);
        answer.finish(result.usage, result.status === "incomplete");
        break;
      }
      case "error": throw Object.assign(new ApiError(500, event.message), { answer });
      default: break;
    }
  }
  await showContainerFiles();
}

async function showContainerFiles() {
  if (!state.container) return;
  const files = await (await api(`/v1/containers/${state.container}/files?order=asc&limit=1000`)).json();
  $("#container-files").replaceChildren(...files.data.map((file) => {
    const link = element("button", { type: "button", class: "link", text: file.path.replace("/mnt/data/", "") });
    link.addEventListener("click", () => download(file));
    return element("li", {}, link, element("span", { class: "size", text: ` ${file.bytes} bytes` }));
  }));
}

// A link cannot carry the API key, so the file is fetched with it and saved from memory.
async function download(file) {
  try {
    const response = await api(`/v1/containers/${state.container}/files/${file.id}/content`);
    const url = URL.createObjectURL(await response.blob());
    const link = element("a", { href: url, download: file.path.split("/").pop() });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (error) {
    notice(`Could not download ${file.path}: ${error.message}`);
  }
}

// -- copy as code ----------------------------------------------------------------------------------------

function python(value, indent = "") {
  const inner = `${indent}    `;
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) {
    if (value.length === 0) return "[]";
    return `[\n${value.map((v) => inner + python(v, inner)).join(",\n")},\n${indent}]`;
  }
  if (typeof value === "object") {
    const entries = Object.entries(value).filter(([, v]) => v !== undefined);
    if (entries.length === 0) return "{}";
    return `{\n${entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${python(v, inner)}`).join(",\n")},\n${indent}}`;
  }
  return JSON.stringify(value);
}

function asCurl(request) {
  const body = JSON.stringify(request.body).replaceAll("'", "'\\''");
  const key = state.key ? ` \\\n  -H "Authorization: Bearer $SMOLRUN_API_KEY"` : "";
  return `curl -N ${location.origin}${request.path}${key} \\\n  -H "Content-Type: application/json" \\\n  -d '${body}'`;
}

function asPython(request) {
  const call = request.path === "/v1/responses" ? "client.responses.create" : "client.chat.completions.create";
  const key = state.key ? 'os.environ["SMOLRUN_API_KEY"]' : '"none"';
  const reading = request.path === "/v1/responses"
    ? "for event in stream:\n    print(event.type)"
    : "for chunk in stream:\n    if chunk.choices and chunk.choices[0].delta.content:\n"
      + "        print(chunk.choices[0].delta.content, end=\"\", flush=True)";
  return `import os\n\nfrom openai import OpenAI\n\nclient = OpenAI(base_url="${location.origin}/v1", api_key=${key})\n`
    + `stream = ${call}(**${python(request.body)})\n${reading}\n`;
}

function showCode(text) {
  $("#code-text").textContent = text;
  $("#code-dialog").showModal();
}

// -- wiring ----------------------------------------------------------------------------------------------

async function send(event) {
  event.preventDefault();
  const text = $("#prompt").value.trim();
  if (!text || state.busy) return;
  const schema = $("#use-schema").checked ? checkSchemaEditor() : null;
  if (schema && schema.error) {
    $("#schema").focus();
    return;
  }
  state.busy = true;
  $("#send").disabled = true;
  $("#prompt").value = "";
  try {
    if (mode() === "code") await sendResponses(text, schema);
    else await sendChat(text, schema);
    state.attachments = [];
    showAttachments();
  } catch (error) {
    if (error.shown) { /* already in the conversation */ } else if (error.answer) error.answer.fail(error);
    else notice(`The request failed: ${error.message}`);
  } finally {
    state.busy = false;
    $("#send").disabled = false;
    $("#copy-curl").disabled = $("#copy-python").disabled = state.lastRequest === null;
    $("#prompt").focus();
  }
}

function reset() {
  if (state.container) {  // the page's own container: freed now rather than at its expiry
    api(`/v1/containers/${state.container}`, { method: "DELETE" }).catch(() => {});
  }
  state.chat = [];
  state.previousId = null;
  state.container = null;
  state.attachments = [];
  showAttachments();
  $("#conversation").replaceChildren();
  $("#container-panel").hidden = true;
  $("#container-files").replaceChildren();
}

function main() {
  loadExample();
  $("#model").addEventListener("change", showCapabilities);
  $("#example").addEventListener("change", loadExample);
  $("#schema").addEventListener("input", checkSchemaEditor);
  $("#temperature").addEventListener("input", () => { $("#temperature-value").textContent = $("#temperature").value; });
  $("#composer").addEventListener("submit", send);
  $("#prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("#composer").requestSubmit();
  });
  $("#files").addEventListener("change", (event) => { addFiles([...event.target.files]); event.target.value = ""; });
  const composer = $("#composer");
  composer.addEventListener("dragover", (event) => { event.preventDefault(); composer.classList.add("dropping"); });
  composer.addEventListener("dragleave", () => composer.classList.remove("dropping"));
  composer.addEventListener("drop", (event) => {
    event.preventDefault();
    composer.classList.remove("dropping");
    addFiles([...event.dataTransfer.files]);
  });
  $("#reset").addEventListener("click", reset);
  $("#key-button").addEventListener("click", () => askForKey(""));
  $("#key-dialog").addEventListener("close", () => {
    if ($("#key-dialog").returnValue !== "save") return;
    state.key = $("#key").value.trim();
    sessionStorage.setItem("smolrun-api-key", state.key);
    loadModels();
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => {
      reset();
      $("#code-settings").hidden = mode() !== "code";
    });
  }
  $("#copy-curl").addEventListener("click", () => showCode(asCurl(state.lastRequest)));
  $("#copy-python").addEventListener("click", () => showCode(asPython(state.lastRequest)));
  $("#code-copy").addEventListener("click", () => navigator.clipboard.writeText($("#code-text").textContent));
  loadModels();
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", main);
else main();
