// The page of `charrnn serve`: no framework, no build step, nothing fetched but this server's API.
"use strict";

const $ = (id) => document.getElementById(id);
let models = {};
let controller = null;

async function loadModels() {
  const r = await fetch("/api/models");
  const body = await r.json();
  const select = $("model");
  for (const m of body.models) {
    models[m.name] = m;
    const o = document.createElement("option");
    o.value = m.name;
    o.textContent = `${m.name} (${m.cell} ${m.size}${m.sentiment_unit ? ", sentiment unit" : ""})`;
    select.appendChild(o);
  }
  modelChanged();
}

function modelChanged() {
  const m = models[$("model").value];
  $("sentiment").hidden = !(m && m.sentiment_unit);
}

function setStatus(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function request() {
  const body = {
    model: $("model").value,
    prime: $("prime").value,
    length: Number($("length").value),
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    words: $("words").value,
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  const m = models[body.model];
  const sentiment = document.querySelector("input[name=sentiment]:checked").value;
  if (m && m.sentiment_unit && sentiment !== "none") body.sentiment = sentiment;
  return body;
}

async function errorMessage(r) {
  try { return (await r.json()).error.message; } catch (e) { return `HTTP ${r.status}`; }
}

async function generate() {
  const body = request();
  const out = $("output");
  out.textContent = "";
  $("legend").hidden = true;
  const prime = document.createElement("span");
  prime.className = "prime";
  prime.textContent = body.prime;
  const made = document.createTextNode("");
  out.append(prime, made);
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  setStatus("generating...");
  let text = "";
  try {
    const r = await fetch("/api/generate", {
      method: "POST", headers: {"content-type": "application/json"},
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) { setStatus(await errorMessage(r), true); return; }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, {stream: true});
      const lines = buffered.split("\n");
      buffered = lines.pop();
      for (const line of lines) {
        if (!line) continue;
        const event = JSON.parse(line);
        if (event.error) { setStatus(event.error.message, true); return; }
        if (event.text) { text += event.text; made.data = text; }
      }
    }
    setStatus(`${text.length} characters`);
    const m = models[body.model];
    if (m && m.sentiment_unit) await heatmap(body.model, body.prime + text);
    setStatus(`done: ${text.length} characters`);
  } catch (e) {
    setStatus(e.name === "AbortError" ? `stopped after ${text.length} characters` : String(e), e.name !== "AbortError");
  } finally {
    controller = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

// The unit's value after each character, on the colours `charrnn neuron show` uses (the server computes them).
async function heatmap(model, text) {
  const r = await fetch("/api/trace", {
    method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify({model, text}),
  });
  if (!r.ok) { setStatus(await errorMessage(r), true); return; }
  const t = await r.json();
  const out = $("output");
  out.textContent = "";
  const chars = Array.from(text);
  chars.forEach((ch, i) => {
    const span = document.createElement("span");
    span.className = "ch";
    span.textContent = ch;
    span.style.background = t.colors[i];
    span.title = t.values[i].toFixed(3);
    out.appendChild(span);
  });
  $("legend").hidden = false;
}

$("model").addEventListener("change", modelChanged);
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
loadModels().catch((e) => setStatus(`could not list the models: ${e}`, true));
