// The playground: pick an endpoint, fill the form built from its schema, run it with live progress and step
// previews (the app's stream route, which enqueues a queue job; the result is then read from the queue protocol's
// result route by request id), see the images with size, seed and timings, and copy the same call for the Python
// client, the JS client and curl.
"use strict";

import { call, el, getJson, HttpError, imageSrc, seconds, setupLogin } from "./common.js";
import { buildForm } from "./schemaform.js";

const state = { endpoints: [], current: null, form: null, lastArgs: {}, lang: "python" };
const $ = (id) => document.getElementById(id);

// -- uploads: the server's storage route (POST /storage/upload/initiate, then PUT the bytes to the URL it answers,
// which is the capability: no key), the same two steps fal's clients take; the form then sends the file URL.
async function upload(file) {
  const response = await call("/storage/upload/initiate", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ content_type: file.type || "application/octet-stream", file_name: file.name }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new HttpError(response.status, body);
  const put = await fetch(body.upload_url, { method: "PUT", body: file,
    headers: { "Content-Type": file.type || "application/octet-stream" } });
  if (!put.ok) throw new Error(`upload refused (${put.status})`);
  return { url: body.file_url, how: "uploaded" };
}

// -- snippets ------------------------------------------------------------------------------------------------------
function pyLiteral(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") return JSON.stringify(value);
  const inner = indent + "    ";
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => inner + pyLiteral(v, inner)).join(",\n")},\n${indent}]`;
  }
  const entries = Object.entries(value);
  if (!entries.length) return "{}";
  return `{\n${entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${pyLiteral(v, inner)}`).join(",\n")},\n${indent}}`;
}

function shortArgs(args) {
  // a data URI would make the snippet unreadable: name it instead
  return JSON.parse(JSON.stringify(args, (k, v) =>
    typeof v === "string" && v.startsWith("data:") && v.length > 200 ? "data:…(the uploaded file)" : v));
}

function snippet(lang, app, args) {
  const host = location.host;
  const origin = location.origin;
  const shown = shortArgs(args);
  if (lang === "python") {
    return `# pip install fal-client
# FAL_RUN_HOST=${host} FAL_QUEUE_RUN_HOST=${host}/queue FAL_KEY=<your key> python this.py
# (the official client speaks https: serve with --ssl-certfile/--ssl-keyfile and trust its CA via SSL_CERT_FILE)
import fal_client

result = fal_client.subscribe(
    "${app}",
    arguments=${pyLiteral(shown, "    ")},
    with_logs=True,
)
print(result)`;
  }
  if (lang === "js") {
    return `// npm install @fal-ai/client
import { fal } from "@fal-ai/client";

fal.config({ credentials: process.env.FAL_KEY, requestMiddleware: async (req) => {
  const u = new URL(req.url), local = "${origin}";
  if (u.hostname === "queue.fal.run") return { ...req, url: \`\${local}/queue\${u.pathname}\${u.search}\` };
  if (u.hostname === "fal.run" || u.hostname === "rest.fal.ai") return { ...req, url: \`\${local}\${u.pathname}\${u.search}\` };
  return req;
}});

const result = await fal.subscribe("${app}", {
  input: ${JSON.stringify(shown, null, 2).replace(/\n/g, "\n  ")},
  logs: true,
});
console.log(result.data);`;
  }
  const body = JSON.stringify(shown).replace(/'/g, "'\\''");
  return `curl -X POST '${origin}/${app}' \\
  -H "Authorization: Key $FAL_KEY" \\
  -H 'Content-Type: application/json' \\
  -d '${body}'`;
}

function renderSnippet() {
  if (!state.current) return;
  $("snippet").textContent = snippet(state.lang, state.current.app_id, state.lastArgs);
  for (const tab of document.querySelectorAll("#snippet-tabs [role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.lang === state.lang));
  }
}

// -- optimization report -------------------------------------------------------------------------------------------
async function loadReport() {
  const box = $("report-body");
  if (!state.current) return;
  try {
    const body = await getJson(`/ui/api/report?app=${encodeURIComponent(state.current.app_id)}`);
    if (!body.models.length) {
      box.replaceChildren(el("p", { class: "muted", text: "No fixed model: each request names its own." }));
      return;
    }
    box.replaceChildren(...body.models.map((m) => {
      if (!m.loaded) return el("p", { class: "muted", text: `${m.model}: not loaded yet (the first run loads it).` });
      const r = m.report;
      return el("div", { class: "report" },
        el("h3", { text: `${m.model} · ${r.device} · config ${r.config_hash}` }),
        el("div", { class: "scroll" }, el("table", {},
          el("thead", {}, el("tr", {}, el("th", { text: "pass" }), el("th", { text: "status" }),
            el("th", { text: "detail" }))),
          el("tbody", {}, r.passes.map((p) => el("tr", { class: p.status },
            el("td", { text: p.name }), el("td", { text: p.status }), el("td", { text: p.detail })))))),
        r.memory_plan.length ? el("div", {}, el("h4", { text: "memory plan" }),
          el("ul", {}, r.memory_plan.map((line) => el("li", { text: line })))) : null,
        r.compile_stats ? el("p", { class: "muted", text: `compiled: ${JSON.stringify(r.compile_stats)}` }) : null);
    }));
  } catch (e) {
    box.replaceChildren(el("p", { class: "field-error", text: `report unavailable: ${e.message}` }));
  }
}

// -- endpoint choice -----------------------------------------------------------------------------------------------
function choose(appId) {
  state.current = state.endpoints.find((e) => e.app_id === appId) || state.endpoints[0];
  if (!state.current) return;
  $("endpoint").value = state.current.app_id;
  const models = state.current.models.join(", ") || "the model each request names (model_name)";
  $("endpoint-models").textContent = `${state.current.task} · served by ${models}`;
  state.form = buildForm($("fields"), state.current.input_schema, upload);
  state.lastArgs = state.form.read();
  $("result").replaceChildren();
  $("progress-box").hidden = true;
  $("form-error").hidden = true;
  history.replaceState(null, "", `#${state.current.app_id}`);
  renderSnippet();
  loadReport();
}

async function load() {
  const body = await getJson("/ui/api/endpoints");
  state.endpoints = body.endpoints;
  $("endpoint").replaceChildren(...state.endpoints.map((e) =>
    el("option", { value: e.app_id, text: `${e.app_id} (${e.task})` })));
  choose(decodeURIComponent(location.hash.slice(1)) || state.current?.app_id);
}

// -- running -------------------------------------------------------------------------------------------------------
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = chunk.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

function images(result) {
  const found = [];
  const walk = (v) => {
    if (!v || typeof v !== "object") return;
    if (Array.isArray(v)) { v.forEach(walk); return; }
    if (typeof v.url === "string" && (v.content_type || "").startsWith("image/")) found.push(v);
    else Object.values(v).forEach(walk);
  };
  walk(result);
  return found;
}

async function showResult(result, requestId) {
  const box = $("result");
  const figures = await Promise.all(images(result).map(async (image, i) => {
    const img = el("img", { alt: `output image ${i + 1}`, class: "output" });
    try { img.src = await imageSrc(image.url); } catch { img.alt += " (could not be fetched)"; }
    return el("figure", {}, img, el("figcaption", { text: `${image.width}×${image.height} ${image.content_type}` }));
  }));
  const timings = result.timings || {};
  box.replaceChildren(
    el("div", { class: "images" }, figures),
    el("dl", { class: "facts", id: "result-facts" },
      el("dt", { text: "request" }), el("dd", { text: requestId || "–" }),
      el("dt", { text: "seed" }), el("dd", { id: "result-seed", text: String(result.seed ?? "–") }),
      Object.entries(timings).map(([k, v]) => [el("dt", { text: k }), el("dd", { text: seconds(v) })])),
    el("details", {}, el("summary", { text: "raw result" }),
      el("pre", { text: JSON.stringify(shortArgs(result), null, 2) })));
}

async function run(event) {
  event.preventDefault();
  if (!state.current) return;
  const app = state.current.app_id;
  state.form.clearErrors();
  $("form-error").hidden = true;
  const args = state.form.read();
  state.lastArgs = args;
  renderSnippet();
  $("run").disabled = true;
  $("result").setAttribute("aria-busy", "true");
  $("progress-box").hidden = false;
  $("progress").value = 0;
  $("progress").removeAttribute("value");  // indeterminate until the first step
  $("progress-text").textContent = "submitted…";
  $("preview").hidden = true;
  $("result").replaceChildren();
  try {
    const response = await call(`/${app}/stream`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(args) });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      $("progress-box").hidden = true;  // refused before it became a job
      throw new HttpError(response.status, body);
    }
    const requestId = response.headers.get("x-fal-request-id");
    let final = null;
    for await (const message of sseEvents(response)) {
      if (message.type === "progress") {
        $("progress").max = message.num_steps;
        $("progress").value = message.step;
        $("progress-text").textContent = `step ${message.step} of ${message.num_steps}`;
        if (message.preview?.url) {
          $("preview").src = await imageSrc(message.preview.url);
          $("preview").hidden = false;
        }
      } else if (message.type === "error") {
        throw new HttpError(422, message);
      } else {
        final = message;
      }
    }
    // the queue protocol's result route, by the request id the stream answered (the job ran on the queue)
    let result = final;
    if (requestId) {
      const queued = await call(`/queue/${app}/requests/${encodeURIComponent(requestId)}`);
      if (queued.ok) result = await queued.json();
    }
    if (!result) throw new Error("the stream ended without a result");
    $("progress").max = 1;
    $("progress").value = 1;
    $("progress-text").textContent = "done";
    await showResult(result, requestId);
    loadReport();
  } catch (e) {
    $("progress").value = 0;
    $("progress-text").textContent = "failed";
    const detail = e instanceof HttpError ? e.body?.detail : null;
    const unplaced = Array.isArray(detail) ? state.form.showErrors(detail) : [e.message];
    if (unplaced.length) {
      $("form-error").textContent = unplaced.join("; ");
      $("form-error").hidden = false;
    }
  } finally {
    $("result").removeAttribute("aria-busy");
    $("run").disabled = false;
  }
}

function init() {
  setupLogin(() => load().catch(() => {}));
  $("endpoint").addEventListener("change", () => choose($("endpoint").value));
  $("args").addEventListener("submit", run);
  $("args").addEventListener("input", () => { state.lastArgs = state.form.read(); renderSnippet(); });
  $("args").addEventListener("change", () => { state.lastArgs = state.form.read(); renderSnippet(); });
  for (const tab of document.querySelectorAll("#snippet-tabs [role=tab]")) {
    tab.addEventListener("click", () => { state.lang = tab.dataset.lang; renderSnippet(); });
  }
  $("copy").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText($("snippet").textContent);
      $("copied").textContent = "copied";
    } catch {
      const range = document.createRange();
      range.selectNodeContents($("snippet"));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      $("copied").textContent = "selected: press Ctrl+C";
    }
  });
  $("report").addEventListener("toggle", () => { if ($("report").open) loadReport(); });
  load().catch(() => {});
}

init();
