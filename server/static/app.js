// The page: regenerate as the prompt changes (debounced) or as the sketch is drawn; one request in flight,
// the newest input wins. Talks only to this server's own API.
"use strict";
const $ = (id) => document.getElementById(id);
const HISTORY = 12;
const DEBOUNCE_MS = 120;
const state = { models: [], busy: false, again: false, timer: null, drawing: false, last: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function call(path, body) {
  const opts = body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || r.status + " " + r.statusText);
  return data;
}

function uniq(xs) { return [...new Set(xs)]; }
function sketchMode() { return document.querySelector("input[name=mode]:checked").value === "sketch"; }
function style() { const s = document.querySelector("input[name=style]:checked"); return s ? s.value : ""; }

function fill(select, values) {
  const keep = select.value;
  select.innerHTML = "";
  for (const v of values) select.add(new Option(v, v));
  if (values.includes(keep)) select.value = keep;
}

// Pickers: model (base), runtime, style (LoRA) and mode (ControlNet) narrow the loaded models to one id.
function refreshPickers() {
  const ms = state.models;
  fill($("model"), uniq(ms.map((m) => m.base)));
  const ofBase = ms.filter((m) => m.base === $("model").value);
  fill($("runtime"), uniq(ofBase.map((m) => m.runtime)));
  const here = ofBase.filter((m) => m.runtime === $("runtime").value);
  const styles = uniq(here.map((m) => m.style || ""));
  const current = style();
  $("styles").innerHTML = "";
  for (const s of styles) {
    const label = document.createElement("label");
    const radio = document.createElement("input");
    radio.type = "radio";
    radio.name = "style";
    radio.value = s;
    label.append(radio, " " + (s || "plain"));
    $("styles").append(label);
  }
  const want = styles.includes(current) ? current : styles[0];
  for (const r of document.querySelectorAll("input[name=style]")) r.checked = r.value === want;
  $("style-box").classList.toggle("hidden", styles.length < 2);
  const canSketch = here.some((m) => m.controlnet);
  $("mode-box").classList.toggle("hidden", !canSketch);
  if (!canSketch) document.querySelector("input[name=mode][value=text]").checked = true;
  $("sketch-box").classList.toggle("hidden", !sketchMode());
}

function entry() {
  const fits = state.models.filter((m) => m.base === $("model").value && m.runtime === $("runtime").value && m.controlnet === sketchMode());
  return fits.find((m) => (m.style || "") === style()) || fits[0];
}

function controlImage(resolution) {
  const small = document.createElement("canvas");
  small.width = small.height = resolution;
  const ctx = small.getContext("2d");
  ctx.drawImage($("sketch"), 0, 0, resolution, resolution);
  const img = ctx.getImageData(0, 0, resolution, resolution);
  for (let i = 0; i < img.data.length; i += 4) {  // binary edges, as canny maps are
    const v = img.data[i] > 48 ? 255 : 0;
    img.data[i] = img.data[i + 1] = img.data[i + 2] = v;
    img.data[i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  return small.toDataURL("image/png");
}

function request() {
  if (state.busy) { state.again = true; return; }
  generate();
}

function later() {
  clearTimeout(state.timer);
  state.timer = setTimeout(request, DEBOUNCE_MS);
}

async function generate() {
  const m = entry();
  const prompt = $("prompt").value;
  if (!m || !prompt.trim()) return;
  state.busy = true;
  state.again = false;
  if ($("new-seed").checked) $("seed").value = Math.floor(Math.random() * 2 ** 31);
  const body = { prompt, model: m.id, seed: Number($("seed").value) || 0 };
  if (m.controlnet) body.control_image = controlImage(m.resolution);
  const t0 = performance.now();
  try {
    const r = await call("/v1/images/generations", body);
    const src = "data:image/png;base64," + r.data[0].b64_json;
    const out = $("output");
    out.src = src;
    out.dataset.count = String(Number(out.dataset.count) + 1);
    const roundTrip = performance.now() - t0;
    const parts = Object.entries(r.timings_ms).map(([k, v]) => `${k} ${v.toFixed(1)} ms`);
    $("stats").textContent = `${parts.join(" · ")} · compute ${r.compute_ms.toFixed(1)} ms (${(1000 / r.compute_ms).toFixed(0)} img/s) · round trip ${roundTrip.toFixed(0)} ms (${(1000 / roundTrip).toFixed(0)} img/s) · ${r.model} on ${m.runtime}, seed ${r.seeds[0]}`;
    $("error").textContent = "";
    addHistory(src, prompt, r.seeds[0]);
  } catch (e) {
    $("error").textContent = e.message;
  } finally {
    state.busy = false;
    if (state.again) generate();
  }
}

function addHistory(src, prompt, seed) {
  if (state.last === src) return;
  state.last = src;
  const a = document.createElement("a");
  a.href = src;
  a.download = `sdxs-${seed}-${prompt.slice(0, 40).replace(/[^a-z0-9]+/gi, "-")}.png`;
  a.title = `${prompt} (seed ${seed}): download`;
  const img = document.createElement("img");
  img.src = src;
  a.append(img);
  $("history").prepend(a);
  while ($("history").children.length > HISTORY) $("history").lastChild.remove();
}

function setupSketch() {
  const c = $("sketch");
  const ctx = c.getContext("2d");
  const clear = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, c.width, c.height); };
  clear();
  const at = (e) => { const r = c.getBoundingClientRect(); return [(e.clientX - r.left) * c.width / r.width, (e.clientY - r.top) * c.height / r.height]; };
  c.addEventListener("pointerdown", (e) => {
    state.drawing = true;
    c.setPointerCapture(e.pointerId);
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = c.width / 48;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(...at(e));
  });
  c.addEventListener("pointermove", (e) => {
    if (!state.drawing) return;
    ctx.lineTo(...at(e));
    ctx.stroke();
    request();
  });
  const end = () => { if (state.drawing) { state.drawing = false; request(); } };
  c.addEventListener("pointerup", end);
  c.addEventListener("pointercancel", end);
  $("clear").addEventListener("click", () => { clear(); request(); });
}

async function init() {
  setupSketch();
  const health = await fetch("/health").then((r) => r.json());
  $("key-box").hidden = !health.auth;
  $("key").value = sessionStorage.getItem("sdxs-key") || "";
  for (const id of ["model", "runtime"]) $(id).addEventListener("change", () => { refreshPickers(); request(); });
  document.addEventListener("change", (e) => { if (e.target.name === "style" || e.target.name === "mode") { refreshPickers(); request(); } });
  $("prompt").addEventListener("input", later);
  $("seed").addEventListener("input", later);
  $("key").addEventListener("change", () => { sessionStorage.setItem("sdxs-key", $("key").value.trim()); loadModels(); });
  await loadModels();
}

async function loadModels() {
  try {
    state.models = (await call("/v1/models")).data;
    $("status").textContent = `${state.models.length} model${state.models.length === 1 ? "" : "s"} loaded`;
    $("error").textContent = "";
    refreshPickers();
    request();
  } catch (e) {
    $("status").textContent = "not connected";
    $("error").textContent = e.message;
  }
}

init();
