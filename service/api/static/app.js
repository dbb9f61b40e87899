// The mixinfer page: send one image to POST /predict and show the answer. No framework, no build step, no inline
// script (the server's Content-Security-Policy forbids it); the API key lives in this page's memory only.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { detail: null, info: null, preview: null };

function headers(extra) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

function setStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

async function errorText(response) {
  try {
    const body = await response.json();
    const err = body.error;
    if (err && typeof err === "object") return `${err.code}: ${err.message}`;
    if (typeof err === "string") return err;
  } catch (_) {
    // not JSON: fall through to the status line
  }
  return `HTTP ${response.status}`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function loadInfo() {
  const response = await fetch("/info", { headers: headers() });
  if (!response.ok) {
    setStatus(response.status === 401 ? "This server needs an API key: type it above." : await errorText(response),
      response.status !== 401);
    return false;
  }
  state.info = await response.json();
  state.detail = state.info.response_detail;
  $("model").textContent = `Model ${state.info.model}, version ${state.info.version}: ` +
    `${state.info.classes.length} classes, images of ${state.info.input_shape.join(" × ")}. ` +
    `Response detail: ${state.detail}.`;
  return true;
}

async function send(blob, name) {
  if (!state.info && !(await loadInfo())) return;
  setStatus(`Sending ${name}…`);
  const response = await fetch("/predict", {
    method: "POST",
    headers: headers({ "Content-Type": blob.type || "application/octet-stream" }),
    body: blob,
  });
  if (!response.ok) {
    setStatus(`${name}: ${await errorText(response)}`, true);
    return;
  }
  const body = await response.json();
  showAnswer(body.predictions[0], blob, name, body);
  setStatus(`${name}: answered by ${body.model} version ${body.version}.`);
  if (state.detail === "full") await loadRecentGaps();
}

function showAnswer(p, blob, name, body) {
  if (state.preview) URL.revokeObjectURL(state.preview);
  state.preview = URL.createObjectURL(blob);
  $("preview").src = state.preview;
  $("preview").alt = `the image sent: ${name}`;
  $("label").textContent = p.label;
  const flag = $("flag");
  flag.className = "flag";
  if (p.adversarial === null || p.adversarial === undefined) {
    flag.textContent = "No adversarial check in this mode";
  } else {
    flag.textContent = p.adversarial ? "Flagged as adversarial" : "Not flagged";
    flag.classList.add(p.adversarial ? "yes" : "no");
  }
  flag.dataset.adversarial = String(p.adversarial);
  $("mode").textContent = `answered by branch ${p.mode}`;
  showProbabilities(p.probabilities);
  showGap(p, body);
  $("result").hidden = false;
}

function showProbabilities(probabilities) {
  const list = $("probs");
  list.replaceChildren();
  const rows = Object.entries(probabilities).sort((a, b) => b[1] - a[1]);
  for (const [name, value] of rows) {
    const item = el("li");
    const meter = el("meter");
    meter.min = 0;
    meter.max = 1;
    meter.value = value;
    meter.setAttribute("aria-label", `class ${name}`);
    item.append(el("span", "name", name), meter, el("span", "value", `${(100 * value).toFixed(1)}%`));
    list.append(item);
  }
  const total = state.info ? state.info.classes.length : rows.length;
  if (rows.length < total) list.append(el("li", "quiet", `top ${rows.length} of ${total} classes`));
}

function showGap(p, body) {
  const box = $("gap");
  box.replaceChildren();
  if (typeof p.detection_gap !== "number" || typeof p.threshold !== "number") {
    const why = p.adversarial === null ? "no gap is computed in this mode" :
      `they are hidden: this server runs MIXINFER_RESPONSE_DETAIL=${state.detail || "label"}`;
    box.append(el("p", "quiet", `Gap and threshold: ${why}.`));
    box.dataset.shown = "false";
    return;
  }
  const over = p.detection_gap >= p.threshold;
  box.append(el("p", "", `gap ${p.detection_gap.toFixed(3)} ${over ? "≥" : "<"} threshold ` +
    `${p.threshold.toFixed(3)} (model ${body.model} ${body.version})`));
  const gauge = el("div", "gauge");
  const lo = Math.min(0, p.detection_gap);
  const span = Math.max(1, p.threshold) - lo;
  const fill = el("div", over ? "fill over" : "fill");
  fill.style.width = `${(100 * (Math.max(p.detection_gap, lo) - lo)) / span}%`;
  const marker = el("div", "marker");
  marker.style.left = `${(100 * (p.threshold - lo)) / span}%`;
  marker.title = "threshold";
  gauge.append(fill, marker);
  box.append(gauge);
  box.dataset.shown = "true";
}

async function loadRecentGaps() {
  const response = await fetch("/recent-gaps", { headers: headers() });
  if (!response.ok) {
    setStatus(`recent gaps: ${await errorText(response)}`, true);
    return;
  }
  const body = await response.json();
  showHistogram(body.gaps, body.threshold, body.window);
}

function showHistogram(gaps, threshold, windowSize) {
  const bins = 24;
  const lo = Math.min(...gaps, threshold, 0);
  const hi = Math.max(...gaps, threshold) + 1e-9;
  const width = (hi - lo) / bins;
  const counts = new Array(bins).fill(0);
  for (const g of gaps) counts[Math.min(bins - 1, Math.floor((g - lo) / width))] += 1;
  const most = Math.max(...counts, 1);
  const histogram = $("histogram");
  histogram.replaceChildren();
  counts.forEach((count, i) => {
    const bin = el("div", lo + (i + 0.5) * width >= threshold ? "bin over" : "bin");
    bin.style.height = `${(100 * count) / most}%`;
    bin.title = `${count} gaps in [${(lo + i * width).toFixed(3)}, ${(lo + (i + 1) * width).toFixed(3)})`;
    histogram.append(bin);
  });
  const marker = el("div", "marker");
  marker.style.left = `${(100 * (threshold - lo)) / (hi - lo)}%`;
  marker.title = "threshold";
  histogram.append(marker);
  const flagged = gaps.filter((g) => g >= threshold).length;
  const summary = `${gaps.length} most recent gaps (up to ${windowSize} kept), ${flagged} at or above the ` +
    `threshold ${threshold.toFixed(3)} (red)`;
  histogram.setAttribute("aria-label", `histogram of ${summary}`);
  const axis = el("div", "axis");
  axis.append(el("span", "", lo.toFixed(2)), el("span", "", hi.toFixed(2)));
  const note = $("recent-note");
  note.replaceChildren(axis, el("p", "", `${summary}.`));
  $("recent").hidden = false;
}

async function sendFile(file) {
  if (file) await send(file, file.name);
}

async function sendSample(name) {
  const response = await fetch(`/ui/samples/${encodeURIComponent(name)}`);
  if (!response.ok) {
    setStatus(`sample ${name}: HTTP ${response.status}`, true);
    return;
  }
  await send(await response.blob(), name);
}

function guard(task) {
  task.catch((err) => setStatus(`failed: ${err}`, true));
}

function start() {
  const drop = $("drop");
  const file = $("file");
  drop.addEventListener("click", () => file.click());
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      file.click();
    }
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    guard(sendFile(event.dataTransfer.files[0]));
  });
  file.addEventListener("change", () => guard(sendFile(file.files[0])));
  for (const button of document.querySelectorAll("[data-sample]")) {
    button.addEventListener("click", () => guard(sendSample(button.dataset.sample)));
  }
  $("api-key").addEventListener("change", () => {
    state.info = null;
    guard(loadInfo());
  });
  guard(loadInfo());
}

document.addEventListener("DOMContentLoaded", start);
