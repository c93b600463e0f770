// alzstage page: vanilla JS, no libraries, no network access beyond this server.
// Everything a client sends back (file names, messages) is inserted with textContent,
// never as HTML.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const state = { classes: [], objectUrls: [] };

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

const pct = (x) => `${(100 * x).toFixed(1)}%`;

// Horizontal bar chart as inline SVG: one row per label, the largest value highlighted.
function barChart(labels, values, { max = 1, format = pct, title = "" } = {}) {
  const rowH = 22, labelW = 150, barW = 200, valueW = 60;
  const width = labelW + barW + valueW, height = rowH * labels.length + 4;
  const svg = svgEl("svg", {
    width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title,
  });
  svg.appendChild(svgEl("title", {}, title));
  const top = values.indexOf(Math.max(...values));
  labels.forEach((label, i) => {
    const y = 2 + i * rowH;
    const w = max > 0 ? Math.max(0, (values[i] / max) * barW) : 0;
    svg.appendChild(svgEl("text", { x: labelW - 6, y: y + 15, "text-anchor": "end" }, label));
    svg.appendChild(svgEl("line", { x1: labelW, x2: labelW, y1: y, y2: y + rowH, class: "axis" }));
    svg.appendChild(svgEl("rect", {
      x: labelW, y: y + 3, width: w.toFixed(1), height: rowH - 6,
      class: i === top ? "bar top" : "bar", "data-value": values[i],
    }));
    svg.appendChild(svgEl("text", { x: labelW + barW + 6, y: y + 15 }, format(values[i])));
  });
  return svg;
}

function setStatus(text, isError = false) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.classList.toggle("error", isError);
}

async function loadModel() {
  const target = document.getElementById("model");
  try {
    const res = await fetch("model");
    const body = await res.json();
    if (!res.ok) {
      target.textContent = body.detail || `model unavailable (HTTP ${res.status})`;
      target.classList.add("error");
      return;
    }
    state.classes = body.classes;
    const parts = [];
    parts.push(body.name ? `Model ${body.name} v${body.version}` : `Model ${body.uri}`);
    if (body.alias) parts[0] += ` (@${body.alias})`;
    const m = body.metrics || {};
    if (m.balanced_accuracy !== undefined) {
      parts.push(`test balanced accuracy ${m.balanced_accuracy.toFixed(3)}`);
    }
    if (m.macro_f1 !== undefined) parts.push(`macro F1 ${m.macro_f1.toFixed(3)}`);
    if (body.split_strategy) {
      parts.push(`${body.split_strategy} split${body.split_leaky ? " (LEAKY: optimistic)" : ""}`);
    }
    // Dataset and recipe, in the words the CLI prints (ModelInfo.provenance).
    if (body.provenance) parts.push(body.provenance);
    target.textContent = parts.join(" · ");
    target.classList.remove("error");
    if (body.synthetic_demo) {
      target.appendChild(el("strong", { class: "badge demo", "data-testid": "synthetic-demo" },
        "synthetic demo model: not trained on real MRI"));
    }
  } catch (err) {
    target.textContent = `cannot reach the server: ${err}`;
    target.classList.add("error");
  }
}

function originalFigure(file, p) {
  const url = URL.createObjectURL(file);
  state.objectUrls.push(url);
  const fig = el("figure");
  fig.appendChild(el("img", { src: url, alt: `original: ${p.filename}`, "data-testid": "original" }));
  fig.appendChild(el("figcaption", {}, "original"));
  return fig;
}

function resultCard(p, file, classes) {
  const card = el("article", { class: "card", "data-testid": "result" });
  card.appendChild(el("h3", {}, p.filename));
  if (p.error) {
    card.classList.add("failed");
    card.appendChild(el("p", { class: "error", "data-testid": "error" },
      `HTTP ${p.status}: ${p.error}`));
    return card;
  }
  if (p.out_of_distribution) {
    // No stage at all: a number here would be read as a diagnosis of a non-brain image.
    card.classList.add("ood");
    card.appendChild(el("p", { class: "stage ood-title", "data-testid": "ood" },
      "Out of distribution: no stage given"));
    card.appendChild(el("p", { class: "ood-reason", "data-testid": "ood-reason" },
      `This image is not like the MRI slices the model was trained on, so any stage would be `
      + `meaningless. ${p.ood_reason}`));
    if (file) card.appendChild(originalFigure(file, p));
    return card;
  }
  const head = el("p");
  head.appendChild(el("span", { class: "stage", "data-testid": "stage" }, p.stage));
  head.appendChild(document.createTextNode(` · confidence ${pct(p.confidence)}`));
  if (p.low_confidence) head.appendChild(el("span", { class: "badge" }, "low confidence"));
  if (p.seen_in_training) {
    head.appendChild(el("span", {
      class: "badge seen", "data-testid": "seen-in-training",
      title: "A near-copy of a slice this model was trained on: its answer here shows what "
        + "it memorised, not how it does on new patients.",
    }, `seen in training (r = ${p.training_correlation.toFixed(3)})`));
  }
  card.appendChild(head);

  const body = el("div", { class: "card-body" });
  const images = el("div", { class: "images" });
  if (file) images.appendChild(originalFigure(file, p));
  if (p.gradcam) {
    const fig = el("figure");
    fig.appendChild(el("img", {
      src: p.gradcam, alt: `Grad-CAM for ${p.stage}`, "data-testid": "gradcam",
    }));
    fig.appendChild(el("figcaption", {}, `Grad-CAM: ${p.stage}`));
    images.appendChild(fig);
  }
  body.appendChild(images);
  const chart = el("figure", { "data-testid": "prob-chart" });
  chart.appendChild(el("figcaption", {}, "calibrated probability per stage"));
  chart.appendChild(barChart(classes, classes.map((c) => p.probabilities[c]), {
    title: `probabilities for ${p.filename}`,
  }));
  body.appendChild(chart);
  card.appendChild(body);
  return card;
}

const isVolume = (f) => /\.nii(\.gz)?$/i.test(f.name);

// One card per brain (a NIfTI volume, or one brain's slice files): the brain-level stage
// and its conformal set first, then a strip of every slice (Grad-CAM on the most
// informative ones, which are outlined; left-out files say why), scrollable sideways.
function brainHead(v, demo) {
  const head = el("div", { class: "brain-head" });
  const line = el("p");
  line.appendChild(el("span", { class: "stage", "data-testid": "stage" }, v.stage));
  line.appendChild(document.createTextNode(` · confidence ${pct(v.confidence)}`));
  if (v.low_confidence) line.appendChild(el("span", { class: "badge" }, "low confidence"));
  if (demo) {
    line.appendChild(el("strong", { class: "badge demo", "data-testid": "card-synthetic-demo" },
      "synthetic demo model: meaningless on real scans"));
  }
  head.appendChild(line);
  // The conformal set: the stages that cannot be ruled out at the stated coverage.
  head.appendChild(el("p", { class: "set", "data-testid": "set-text" }, v.set_text
    ? `Could be: ${v.set_text}`
    : "No prediction set: the model stores no calibrated brain model."));
  const how = v.brain_model === "pool (no brain model stored)"
    ? `brain model: none stored with this model; fixed pooling rule (${v.aggregate})`
    : `brain model ${v.brain_model}; fixed pooling rule (${v.aggregate}): ${v.pooled_stage}`;
  const where = v.kind === "brain"
    ? `${v.n_slices_used} of ${v.n_slices} slice files used`
    : `${v.n_slices} slices · registration ${v.registration_score.toFixed(2)}`;
  head.appendChild(el("p", { class: "brain-how", "data-testid": "brain-model" },
    `${how} · ${where}`));
  return head;
}

function sliceFigure(s) {
  const fig = el("figure", { class: s.informative ? "slice informative" : "slice" });
  const where = s.z_mm === null || s.z_mm === undefined ? (s.filename || `file ${s.index}`)
    : `z ${s.z_mm} mm`;
  if (s.left_out) {
    fig.classList.add("left-out");
    fig.appendChild(el("div", { class: "left-out-box", "data-testid": "slice-left-out",
      title: s.left_out }, "left out"));
    fig.appendChild(el("figcaption", {}, `${where} · ${s.out_of_distribution
      ? "out of distribution" : "unreadable"}`));
    return fig;
  }
  fig.appendChild(el("img", {
    src: s.gradcam || s.image,
    alt: `slice ${s.index} (${where})${s.gradcam ? ", Grad-CAM" : ""}`,
    "data-testid": s.gradcam ? "slice-gradcam" : "slice",
  }));
  fig.appendChild(el("figcaption", {}, `${where} · ${s.stage} ${pct(s.confidence)}`));
  return fig;
}

function volumeCard(v, classes, demo = false) {
  const card = el("article", { class: "card volume", "data-testid": "volume-result" });
  card.dataset.kind = v.kind || "volume";
  card.appendChild(el("h3", {}, v.filename));
  if (v.error) {
    card.classList.add("failed");
    card.appendChild(el("p", { class: "error", "data-testid": "error" },
      `HTTP ${v.status}: ${v.error}`));
    return card;
  }
  card.appendChild(brainHead(v, demo));
  const chart = el("figure", { "data-testid": "prob-chart" });
  chart.appendChild(el("figcaption", {}, "brain-level probability per stage"));
  chart.appendChild(barChart(classes, classes.map((c) => v.probabilities[c]), {
    title: `probabilities for ${v.filename}`,
  }));
  card.appendChild(chart);
  const strip = el("div", { class: "strip", "data-testid": "slice-strip" });
  for (const s of v.slices || []) strip.appendChild(sliceFigure(s));
  card.appendChild(strip);
  return card;
}

async function postFiles(url, files) {
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const res = await fetch(url, { method: "POST", body: form });
  let data;
  try {
    data = await res.json();
  } catch {
    data = { detail: `HTTP ${res.status} without a JSON body` };
  }
  return { res, data };
}

async function submitVolumes(files, explain) {
  const target = document.getElementById("volumes");
  const { res, data } = await postFiles(`predict/volume?gradcam=${explain}`, files);
  const classes = data.classes || state.classes;
  const demo = Boolean(data.model && data.model.synthetic_demo);
  (data.predictions || []).forEach((v) => target.appendChild(volumeCard(v, classes, demo)));
  return res.ok ? `${data.summary.n_predicted} of ${files.length} volume(s) predicted`
    : `volumes: ${data.detail || `HTTP ${res.status}`}`;
}

// All the chosen slices as ONE brain: one brain-level card (stage, set, slice strip).
async function submitBrain(files, explain) {
  const target = document.getElementById("volumes");
  const { res, data } = await postFiles(`predict/brain?gradcam=${explain}`, files);
  const classes = data.classes || state.classes;
  const demo = Boolean(data.model && data.model.synthetic_demo);
  if (res.ok) {
    (data.predictions || []).forEach((v) => target.appendChild(volumeCard(v, classes, demo)));
    const b = data.predictions[0];
    return `one brain from ${b.n_slices_used} of ${files.length} slice(s)`;
  }
  return `brain: ${data.detail || `HTTP ${res.status}`}`;
}

function renderSummary(data) {
  const section = document.getElementById("summary");
  const s = data.summary;
  if (!s || data.predictions.length < 2) {
    section.hidden = true;
    return;
  }
  const chart = document.getElementById("dist-chart");
  chart.replaceChildren(barChart(
    data.classes, data.classes.map((c) => s.stage_counts[c]),
    { max: Math.max(1, ...Object.values(s.stage_counts)), format: (v) => String(v),
      title: "number of slices per predicted stage" },
  ));
  const text = document.getElementById("summary-text");
  const mean = s.mean_confidence === null ? "n/a" : pct(s.mean_confidence);
  text.textContent = `${s.n_predicted} of ${s.n_images} slices predicted; mean confidence ${mean}; `
    + `${s.n_low_confidence} below ${pct(s.low_confidence_threshold)}`
    + (s.n_out_of_distribution ? `; ${s.n_out_of_distribution} out of distribution (no stage)` : "")
    + (s.n_seen_in_training ? `; ${s.n_seen_in_training} seen in training` : "")
    + (s.n_errors ? `; ${s.n_errors} could not be read.` : ".");
  const tbody = document.querySelector("#confidence-table tbody");
  tbody.replaceChildren();
  for (const p of data.predictions) {
    const tr = el("tr");
    tr.appendChild(el("td", {}, p.filename));
    const ood = !p.error && p.out_of_distribution;
    tr.appendChild(el("td", {}, p.error ? "error" : (ood ? "out of distribution" : p.stage)));
    tr.appendChild(el("td", { class: "num" }, p.error || ood ? "" : pct(p.confidence)));
    tr.appendChild(el("td", {}, p.error ? `HTTP ${p.status}`
      : (ood ? "no stage" : (p.low_confidence ? "low" : ""))
        + (p.seen_in_training ? " seen in training" : "")));
    tbody.appendChild(tr);
  }
  section.hidden = false;
}

async function submit(event) {
  event.preventDefault();
  const input = document.getElementById("files");
  const files = Array.from(input.files || []);
  if (!files.length) {
    setStatus("Choose at least one image first.", true);
    return;
  }
  const explain = document.getElementById("gradcam").checked;
  const volumes = files.filter(isVolume);
  const slices = files.filter((f) => !isVolume(f));
  const button = document.getElementById("submit");
  button.disabled = true;
  setStatus(volumes.length
    ? `Registering and predicting ${volumes.length} volume(s) and ${slices.length} slice(s)…`
    : `Predicting ${files.length} slice${files.length > 1 ? "s" : ""}…`);
  const results = document.getElementById("results");
  state.objectUrls.forEach((u) => URL.revokeObjectURL(u));
  state.objectUrls = [];
  results.replaceChildren();
  document.getElementById("volumes").replaceChildren();
  document.getElementById("summary").hidden = true;
  try {
    let volumeStatus = volumes.length ? await submitVolumes(volumes, explain) : "";
    if (slices.length && document.getElementById("one-brain").checked) {
      const brainStatus = await submitBrain(slices, explain);
      volumeStatus = [volumeStatus, brainStatus].filter(Boolean).join("; ");
      setStatus(`Done: ${volumeStatus}.`, /(^|; )(volumes|brain):/.test(volumeStatus));
      if (!state.classes.length) loadModel();
      return;
    }
    if (!slices.length) {
      setStatus(`Done: ${volumeStatus}.`, volumeStatus.startsWith("volumes:"));
      if (!state.classes.length) loadModel();
      return;
    }
    const { res, data } = await postFiles(`predict?gradcam=${explain}`, slices);
    const predictions = data.predictions || [];
    const classes = data.classes || state.classes;
    predictions.forEach((p) => results.appendChild(resultCard(p, slices[p.index], classes)));
    const extra = volumeStatus ? ` ${volumeStatus}.` : "";
    if (res.ok) {
      renderSummary(data);
      const m = data.model || {};
      let used = m.name ? `${m.name} v${m.version}` : m.uri;
      if (m.synthetic_demo) used += " (synthetic demo model)";
      setStatus(
        `Done: ${data.summary.n_predicted} of ${slices.length} predicted with ${used}.${extra}`);
      if (!state.classes.length) loadModel();
    } else {
      setStatus((data.detail || `HTTP ${res.status}`) + extra, true);
    }
  } catch (err) {
    setStatus(`Request failed: ${err}`, true);
  } finally {
    button.disabled = false;
  }
}

function setupDrop() {
  const drop = document.getElementById("drop");
  const input = document.getElementById("files");
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer && e.dataTransfer.files.length) input.files = e.dataTransfer.files;
    setStatus(`${input.files.length} file(s) selected.`);
  });
  input.addEventListener("change", () => setStatus(`${input.files.length} file(s) selected.`));
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("upload").addEventListener("submit", submit);
  setupDrop();
  loadModel();
});
