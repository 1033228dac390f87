// dense-serve demo page: pick an image, get its depth, normals and uncertainty from this server's REST API.
// Plain JS, no build step, no inline code (the page is served with a strict Content-Security-Policy).
"use strict";

const KEY_STORAGE = "dense-serve-api-key"; // sessionStorage: kept in this tab only
const $ = (id) => document.getElementById(id);
const state = { file: null, models: [], runs: 0 };
const panels = {
  depth: $("panel-depth"),
  normals: $("panel-normals"),
  uncertainty: $("panel-uncertainty"),
};

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// An RFC 9457 problem (or whatever a proxy sent) as "title: detail".
async function problemText(response) {
  try {
    const problem = await response.json();
    if (problem && problem.title) {
      return problem.detail ? `${problem.title}: ${problem.detail}` : problem.title;
    }
  } catch (_) {
    // not JSON
  }
  return `${response.status} ${response.statusText}`;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

function option(select, value, label) {
  const opt = document.createElement("option");
  opt.value = value;
  opt.textContent = label;
  select.append(opt);
}

async function loadModels() {
  $("status").textContent = "Loading models...";
  let response;
  try {
    response = await fetch("/v1/models", { headers: authHeaders() });
  } catch (err) {
    showError(`The server did not answer: ${err}`);
    return;
  }
  if (!response.ok) {
    showError(await problemText(response));
    $("status").textContent = "No models listed.";
    return;
  }
  showError("");
  state.models = (await response.json()).models;
  fillModels();
  $("status").textContent = state.models.length
    ? `${state.models.length} model(s): ${state.models.map((m) => m.id).join(", ")}`
    : "The server serves no model yet.";
  updateRunButton();
}

function fillModels() {
  const uncertaintyTask = $("uncertainty-task").value;
  const choices = {
    depth: state.models.filter((m) => m.task === "depth"),
    normals: state.models.filter((m) => m.task === "normals"),
    uncertainty: state.models.filter((m) => m.generative && m.task === uncertaintyTask),
  };
  for (const [task, models] of Object.entries(choices)) {
    const select = $(`model-${task}`);
    const previous = select.value;
    select.replaceChildren();
    for (const m of models) {
      option(select, m.id, `${m.id} (${m.family}, ${m.output_kind})${m.random_weights ? ", random weights" : ""}`);
    }
    if (!models.length) option(select, "", "none served");
    if (models.some((m) => m.id === previous)) select.value = previous;
    select.disabled = !models.length;
  }
  describePanels();
}

// The camera-frame axes of a normals model ("+x image left, +y image up, +z towards the camera") as the sign
// of each against OpenGL's (+x right, +y up, +z towards the camera); OpenGL's when the server does not say.
function normalsAxes(words) {
  const w = words || "";
  return {
    x: w.includes("+x image left") ? -1 : 1,
    y: w.includes("+y image down") ? -1 : 1,
    z: w.includes("+z away from") ? -1 : 1,
    words: w,
  };
}

// A sphere facing the camera, each point coloured as the server colours a surface facing that way:
// round((n + 1) / 2 * 255) of its normal n in the model's axes (service/codec quantize_normals).
function drawNormalsSphere(canvas, axes) {
  const ctx = canvas.getContext("2d");
  const size = canvas.width;
  const img = ctx.createImageData(size, size);
  const r = size / 2;
  for (let j = 0; j < size; j++) {
    for (let i = 0; i < size; i++) {
      const u = (i + 0.5) / r - 1; // image right
      const v = 1 - (j + 0.5) / r; // image up
      const d = u * u + v * v;
      if (d > 1) continue; // transparent outside the sphere
      const n = [axes.x * u, axes.y * v, axes.z * Math.sqrt(1 - d)];
      const at = (j * size + i) * 4;
      for (let c = 0; c < 3; c++) img.data[at + c] = Math.round(((n[c] + 1) / 2) * 255);
      img.data[at + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
}

function selectedModel(task) {
  const id = $(`model-${task}`).value;
  return state.models.find((m) => m.id === id);
}

// Above each map: which model makes it, at which processing_res, whether its weights are trained; a
// random-weight model's panel says plainly that its map is noise. Below it: how to read the colours.
function describePanel(task) {
  const panel = panels[task];
  const m = selectedModel(task);
  const notice = panel.querySelector(".random-weights");
  notice.hidden = !(m && m.random_weights);
  notice.textContent = m && m.random_weights
    ? `Random weights: ${m.id} is an untrained test checkpoint, so this map is noise, not a prediction.`
    : "";
  if (!m) {
    panel.querySelector(".model").textContent = "";
    return;
  }
  const override = $("processing-res").value.trim();
  const res = override === "" ? m.processing_res : Number(override);
  const resText = res === 0 ? "native size" : `processing_res ${res}`;
  const weights = m.random_weights === true ? "random weights" : m.random_weights === false ? "trained" : "";
  panel.querySelector(".model").textContent =
    `${m.id}: ${m.family} ${m.output_kind}, ${resText}${override === "" ? "" : " (set above)"}` +
    (weights ? `; ${weights}` : "");
  if (task === "normals") {
    const axes = normalsAxes(m.normals_convention);
    drawNormalsSphere(panel.querySelector(".sphere"), axes);
    const side = (sign, plus, minus) => (sign > 0 ? plus : minus);
    panel.querySelector(".axes .x").textContent = `red: x, high = facing image ${side(axes.x, "right", "left")}`;
    panel.querySelector(".axes .y").textContent = `green: y, high = facing image ${side(axes.y, "up", "down")}`;
    panel.querySelector(".axes .z").textContent =
      `blue: z, high = facing ${side(axes.z, "the camera", "away from the camera")}`;
  }
  if (task === "uncertainty") {
    const normals = $("uncertainty-task").value === "normals";
    panel.querySelector(".legend .low").textContent = normals ? "low: 0°" : "low: 0";
    panel.querySelector(".legend .high").textContent = normals
      ? "high: 180°"
      : "high: ≥ 1 (the depth range)";
  }
}

function describePanels() {
  for (const task of Object.keys(panels)) describePanel(task);
}

function updateRunButton() {
  $("run").disabled = !state.file || !state.models.length;
}

function params(task) {
  const query = new URLSearchParams();
  const model = $(`model-${task}`).value;
  if (model) query.set("model", model);
  // steps and the uncertainty method only mean something to a multi-step model (single-step ones refuse them)
  const multiStep = state.models.some((m) => m.id === model && m.multi_step);
  const steps = $("steps").value.trim();
  if (multiStep && steps !== "") query.set("steps", steps);
  if (multiStep && task === "uncertainty") query.set("method", $("uncertainty-method").value);
  const res = $("processing-res").value.trim();
  if (res !== "") query.set("processing_res", res);
  const seed = $("seed").value.trim();
  if (seed !== "") query.set("seed", seed);
  if (task === "uncertainty") {
    query.set("task", $("uncertainty-task").value);
    const seeds = $("seeds").value.trim();
    if (seeds !== "") query.set("seeds", seeds);
  }
  return query;
}

function predict(task, format) {
  const query = params(task);
  query.set("format", format);
  return fetch(`/v1/${task}?${query}`, {
    method: "POST",
    headers: { ...authHeaders(), "Content-Type": state.file.type || "application/octet-stream" },
    body: state.file,
  });
}

// "decode;dur=1.2, compute;dur=30.5" -> {decode: 1.2, compute: 30.5}
function serverTiming(header) {
  const timings = {};
  for (const entry of (header || "").split(",")) {
    const [name, ...opts] = entry.split(";").map((s) => s.trim());
    for (const opt of opts) if (opt.startsWith("dur=")) timings[name] = Number(opt.slice(4));
  }
  return timings;
}

function setPanel(panel, panelState, { meta = "", error = "" } = {}) {
  panel.dataset.state = panelState;
  panel.querySelector(".meta").textContent = meta;
  const box = panel.querySelector(".error");
  box.textContent = error;
  box.hidden = !error;
  for (const button of panel.querySelectorAll(".downloads button")) button.disabled = panelState !== "done";
}

async function runPanel(task, run) {
  const panel = panels[task];
  const img = panel.querySelector("img");
  if (!$(`model-${task}`).value) {
    img.hidden = true;
    setPanel(panel, "unavailable", { meta: `no model serves ${task} here` });
    return;
  }
  setPanel(panel, "loading", { meta: "computing..." });
  let response;
  try {
    response = await predict(task, "color");
  } catch (err) {
    setPanel(panel, "error", { error: `The server did not answer: ${err}` });
    return;
  }
  if (run !== state.runs) return; // a newer run started meanwhile
  if (!response.ok) {
    img.hidden = true;
    setPanel(panel, "error", { error: await problemText(response) });
    return;
  }
  const blob = await response.blob();
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  await new Promise((resolve) => {
    img.onload = resolve;
    img.onerror = resolve;
    img.src = URL.createObjectURL(blob);
  });
  img.hidden = false;
  const h = response.headers;
  const t = serverTiming(h.get("Server-Timing"));
  const fmt = (v) => (v === undefined ? "-" : `${v.toFixed(0)} ms`);
  const meta =
    `${h.get("X-Model")} (${h.get("X-Output-Kind")}), ${img.naturalWidth}x${img.naturalHeight}; ` +
    `total ${fmt(t.total)}, compute ${fmt(t.compute)}, queue ${fmt(t.queue)}; batch of ${h.get("X-Batch-Size")}` +
    (Number(h.get("X-Steps")) > 1 ? `; ${h.get("X-Steps")} steps` : "") +
    (h.get("X-Uncertainty-Method") ? `; method ${h.get("X-Uncertainty-Method")}` : "");
  setPanel(panel, "done", { meta });
}

async function run() {
  if (!state.file) return;
  state.runs += 1;
  const runId = state.runs;
  showError("");
  await Promise.all(Object.keys(panels).map((task) => runPanel(task, runId)));
}

async function download(task, format) {
  const panel = panels[task];
  const response = await predict(task, format);
  if (!response.ok) {
    setPanel(panel, "error", { error: await problemText(response) });
    return;
  }
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  const stem = (state.file.name || "image").replace(/\.[^.]*$/, "");
  link.href = url;
  link.download = `${stem}-${task}.${format}`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function choose(file) {
  if (!file) return;
  state.file = file;
  const input = $("panel-input");
  const img = input.querySelector("img");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.onload = () => {
    input.querySelector(".meta").textContent = `${file.name}, ${img.naturalWidth}x${img.naturalHeight}`;
    input.dataset.state = "done";
  };
  img.src = URL.createObjectURL(file);
  img.hidden = false;
  $("drop-text").textContent = file.name;
  updateRunButton();
  if (state.models.length) run();
}

function init() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("key-form").addEventListener("submit", (e) => e.preventDefault()); // Enter in the key field
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    loadModels();
  });
  $("file").addEventListener("change", (e) => choose(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    choose(e.dataTransfer.files[0]);
  });
  $("uncertainty-task").addEventListener("change", fillModels);
  for (const task of Object.keys(panels)) $(`model-${task}`).addEventListener("change", () => describePanel(task));
  $("processing-res").addEventListener("input", describePanels);
  $("run").addEventListener("click", run);
  for (const [task, panel] of Object.entries(panels)) {
    for (const button of panel.querySelectorAll(".downloads button")) {
      button.addEventListener("click", () => download(task, button.dataset.format));
    }
  }
  loadModels();
}

document.addEventListener("DOMContentLoaded", init);
