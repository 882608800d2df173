"""The playground at `/`: one self-contained HTML page (inline CSS and JS, nothing fetched from elsewhere).

It lists the models of `GET /v1/models` as checkboxes and sends one prompt to each checked model through
`POST /v1/chat/completions` with `stream: true`, showing the answers side by side as their chunks arrive; for
`auto` it shows the adapter that answered (the `x-loraplex-route` header and the response's `model`).

Query parameters fill the form and can run it once the page has loaded:
`/?prompt=Write%2042&models=base,en,auto&max_tokens=32&temperature=0&autorun=1`. When all answers are in, the
page sets `data-state="done"` on <body>. An API key typed in the key field is kept in the browser's
localStorage and sent as `Authorization: Bearer <key>`.
"""
from __future__ import annotations

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>loraplex playground</title>
<style>
  :root { --fg: #1d2330; --muted: #667085; --line: #d0d5dd; --accent: #3056d3; --bg: #f6f7f9; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK SC", sans-serif;
         color: var(--fg); background: var(--bg); }
  header { padding: 14px 24px; background: #fff; border-bottom: 1px solid var(--line); display: flex;
           align-items: baseline; gap: 16px; }
  header h1 { font-size: 18px; margin: 0; }
  header span { color: var(--muted); font-size: 13px; }
  main { padding: 18px 24px; max-width: 1600px; }
  textarea { width: 100%; min-height: 88px; padding: 10px; font: inherit; border: 1px solid var(--line);
             border-radius: 6px; resize: vertical; background: #fff; }
  .row { display: flex; flex-wrap: wrap; align-items: center; gap: 10px 18px; margin: 10px 0; }
  .models label { display: inline-flex; align-items: center; gap: 5px; padding: 4px 10px; background: #fff;
                  border: 1px solid var(--line); border-radius: 14px; cursor: pointer; font-size: 14px; }
  .models label small { color: var(--muted); }
  input[type=number], input[type=password] { width: 90px; padding: 5px; font: inherit; border: 1px solid var(--line);
                                             border-radius: 5px; }
  input[type=password] { width: 220px; }
  button { padding: 8px 20px; font: inherit; font-weight: 600; color: #fff; background: var(--accent); border: 0;
           border-radius: 6px; cursor: pointer; }
  button:disabled { opacity: .55; cursor: wait; }
  #notice { color: #b42318; min-height: 1.2em; }
  #answers { display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: 14px; margin-top: 8px; }
  .panel { background: #fff; border: 1px solid var(--line); border-radius: 8px; display: flex; flex-direction: column;
           min-height: 140px; }
  .panel h2 { font-size: 14px; margin: 0; padding: 8px 12px; border-bottom: 1px solid var(--line);
              display: flex; justify-content: space-between; gap: 8px; }
  .panel .route { color: var(--accent); font-weight: 500; }
  .panel .meta { color: var(--muted); font-weight: 400; font-size: 12px; }
  .panel pre { margin: 0; padding: 10px 12px; white-space: pre-wrap; word-break: break-word; font: 14px/1.5
               ui-monospace, "SFMono-Regular", Menlo, Consolas, "Noto Sans Mono CJK SC", monospace; flex: 1; }
  .panel.error pre { color: #b42318; }
  .panel[data-state=streaming] h2::after { content: "…"; color: var(--muted); }
</style>
</head>
<body data-state="loading">
<header><h1>loraplex playground</h1><span>one prompt, several adapters of one base, answers side by side</span></header>
<main>
  <textarea id="prompt" placeholder="Type a prompt, e.g. Write 42 in words."></textarea>
  <div class="row models" id="models"></div>
  <div class="row">
    <label>max tokens <input type="number" id="max_tokens" min="1" value="64"></label>
    <label>temperature <input type="number" id="temperature" min="0" max="2" step="0.1" value="0"></label>
    <label id="keybox">API key
      <input type="password" id="key" autocomplete="off" placeholder="if the server needs one"></label>
    <button id="go">Compare</button>
  </div>
  <div id="notice"></div>
  <div id="answers"></div>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
const stored = (() => { try { return localStorage.getItem("loraplex-key") || ""; } catch (e) { return ""; } })();
$("key").value = stored;

function headers() {
  const h = {"content-type": "application/json"};
  const key = $("key").value.trim();
  if (key) h["authorization"] = "Bearer " + key;
  return h;
}

function describe(m) {
  const info = m.loraplex || {};
  if (m.id === "auto") return "routes to the nearest adapter";
  const parts = [];
  if (info.kind && info.kind !== "adapter" && info.kind !== m.id) parts.push(info.kind);
  if (info.target_modules) parts.push([].concat(info.target_modules).join(","));
  if (info.r) parts.push("r=" + info.r);
  return parts.join(" · ");
}

async function loadModels() {
  $("notice").textContent = "";
  const res = await fetch("/v1/models", {headers: headers()});
  if (res.status === 401) {
    $("notice").textContent = "This server needs an API key: type it in the API key field, then reload the models.";
    $("key").focus();
    document.body.dataset.state = "needs-key";
    return false;
  }
  const body = await res.json();
  const wanted = (query.get("models") || "").split(",").map((s) => s.trim()).filter(Boolean);
  const box = $("models");
  box.textContent = "";
  for (const m of body.data) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = m.id;
    input.checked = wanted.length ? wanted.includes(m.id) : true;
    const small = document.createElement("small");
    small.textContent = describe(m);
    label.append(input, " " + m.id + " ", small);
    box.append(label);
  }
  document.body.dataset.state = "ready";
  return true;
}

function panelFor(model) {
  const panel = document.createElement("section");
  panel.className = "panel";
  panel.dataset.model = model;
  const title = document.createElement("h2");
  const name = document.createElement("span");
  name.textContent = model;
  const route = document.createElement("span");
  route.className = "route";
  const meta = document.createElement("span");
  meta.className = "meta";
  title.append(name, route, meta);
  const pre = document.createElement("pre");
  pre.className = "answer";
  panel.append(title, pre);
  $("answers").append(panel);
  return {panel, route, meta, pre};
}

async function ask(model, prompt, view) {
  const started = performance.now();
  view.panel.dataset.state = "streaming";
  const body = {model, messages: [{role: "user", content: prompt}], stream: true,
                max_tokens: Number($("max_tokens").value) || 64, temperature: Number($("temperature").value) || 0};
  try {
    const res = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body)});
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || ("HTTP " + res.status));
    }
    const routed = res.headers.get("x-loraplex-route");
    if (routed) view.route.textContent = "→ " + routed;
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", tokens = 0, done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") { done = true; break; }
          const json = JSON.parse(data);
          if (json.error) throw new Error(json.error.message);
          if (model === "auto" && json.model) view.panel.dataset.routed = json.model;
          if (model === "auto" && json.model && !routed) view.route.textContent = "→ " + json.model;
          const choice = json.choices && json.choices[0];
          if (choice && choice.delta && choice.delta.content) view.pre.textContent += choice.delta.content;
          if (json.usage) tokens = json.usage.completion_tokens;
        }
      }
    }
    view.meta.textContent = tokens + " tokens, " + ((performance.now() - started) / 1000).toFixed(1) + " s";
    view.panel.dataset.state = "done";
  } catch (error) {
    view.panel.classList.add("error");
    view.pre.textContent += (view.pre.textContent ? "\n" : "") + "error: " + error.message;
    view.panel.dataset.state = "error";
  }
}

async function compare() {
  const prompt = $("prompt").value;
  const models = [...document.querySelectorAll("#models input:checked")].map((i) => i.value);
  if (!prompt.trim() || !models.length) {
    $("notice").textContent = "Type a prompt and check at least one model.";
    return;
  }
  $("notice").textContent = "";
  try { localStorage.setItem("loraplex-key", $("key").value.trim()); } catch (e) { /* private mode */ }
  $("go").disabled = true;
  $("answers").textContent = "";
  document.body.dataset.state = "running";
  await Promise.all(models.map((m) => ask(m, prompt, panelFor(m))));
  $("go").disabled = false;
  document.body.dataset.state = "done";
}

$("go").addEventListener("click", compare);
$("key").addEventListener("change", loadModels);
for (const name of ["prompt", "max_tokens", "temperature"]) {
  if (query.has(name)) $(name).value = query.get(name);
}
loadModels().then((ok) => { if (ok && query.get("autorun") === "1") return compare(); })
  .catch((error) => { $("notice").textContent = "cannot list the models: " + error.message; });
</script>
</body>
</html>
"""


def playground_html() -> str:
    """The page served at `/`."""
    return PAGE
