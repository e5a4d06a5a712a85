// The job page: the caller's jobs, live progress, and a finished job's report.
// Plain browser JS, no build step and no library. The API key typed in stays in
// sessionStorage (gone when the tab closes) and travels only as `Authorization: Bearer`,
// never in a URL: so progress is streamed with fetch() (EventSource cannot send headers)
// and downloads are fetched, then saved from a blob.
"use strict";

const KEY_STORAGE = "monoquant.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);

let selectedJob = null;
let followAbort = null;
let listTimer = null;

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// Paths relative to the page, so the service may live under a path prefix.
function url(path) {
  return new URL(path, document.baseURI).toString();
}

async function api(path, options = {}) {
  const response = await fetch(url(path), { ...options, headers: headers(options.headers || {}) });
  if (!response.ok) {
    let problem = { detail: `${response.status} ${response.statusText}` };
    try {
      problem = await response.json();
    } catch (_) {
      /* not problem+json */
    }
    const error = new Error(problem.detail || `HTTP ${response.status}`);
    error.status = response.status;
    error.suggestion = problem.suggestion;
    throw error;
  }
  return response;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("data-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function bytes(value) {
  if (value === null || value === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let size = Number(value);
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return `${size.toFixed(unit ? 1 : 0)} ${units[unit]} (${Number(value).toLocaleString("en")} bytes)`;
}

function number(value, digits = 2, unit = "") {
  if (typeof value !== "number" || !Number.isFinite(value)) return "not measured";
  return unit ? `${value.toFixed(digits)} ${unit}` : value.toFixed(digits);
}

function percent(fraction) {
  return `${Math.round((fraction || 0) * 100)}%`;
}

// -- the key -----------------------------------------------------------------------------------
function showKeyState() {
  $("key-state").textContent = apiKey() ? "key set for this tab" : "no key (open server)";
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("api-key").value.trim();
  if (value) sessionStorage.setItem(KEY_STORAGE, value);
  else sessionStorage.removeItem(KEY_STORAGE);
  $("api-key").value = "";
  showKeyState();
  loadJobs();
  if (selectedJob) showJob(selectedJob);
});

$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  showKeyState();
  loadJobs();
});

// -- the list ----------------------------------------------------------------------------------
async function loadJobs() {
  clearTimeout(listTimer);
  const body = $("jobs").tBodies[0];
  try {
    const page = await (await api("v1/jobs?limit=50")).json();
    $("list-message").textContent = page.items.length ? "" : "No jobs yet: submit one with POST /v1/quantize.";
    body.replaceChildren(
      ...page.items.map((job) => {
        const row = el(
          "tr",
          { "data-job-id": job.id, "data-status": job.status },
          el("td", {}, el("code", {}, job.id.slice(0, 8))),
          el("td", {}, el("span", { class: `status ${job.status}` }, job.status)),
          el("td", {}, job.status === "running" ? `${job.progress.stage} ${percent(job.progress.fraction)}` : ""),
          el("td", {}, new Date(job.created_at).toLocaleString()),
        );
        if (job.id === selectedJob) row.classList.add("selected");
        row.addEventListener("click", () => selectJob(job.id));
        return row;
      }),
    );
    if (page.items.some((job) => !TERMINAL.has(job.status))) listTimer = setTimeout(loadJobs, POLL_MS);
  } catch (error) {
    body.replaceChildren();
    $("list-message").textContent =
      error.status === 401 ? "This server needs an API key: type it above." : `Could not list jobs: ${error.message}`;
  }
}

$("refresh").addEventListener("click", loadJobs);

// -- one job -----------------------------------------------------------------------------------
function selectJob(jobId) {
  selectedJob = jobId;
  history.replaceState(null, "", `#job=${encodeURIComponent(jobId)}`);
  for (const row of $("jobs").tBodies[0].rows) row.classList.toggle("selected", row.dataset.jobId === jobId);
  showJob(jobId);
}

function showProgress(stage, fraction) {
  $("progress-fill").style.width = percent(fraction);
  $("progress-text").textContent = `${stage} ${percent(fraction)}`;
}

async function showJob(jobId) {
  if (followAbort) followAbort.abort();
  $("detail").hidden = false;
  $("report").hidden = true;
  $("job-error").hidden = true;
  $("detail-id").textContent = jobId;
  let job;
  try {
    job = await (await api(`v1/jobs/${encodeURIComponent(jobId)}`)).json();
  } catch (error) {
    showError({ type: "Error", message: error.message, suggestion: error.suggestion });
    return;
  }
  if (jobId !== selectedJob) return;
  $("detail-status").textContent = job.status;
  $("detail-status").className = `status ${job.status}`;
  showProgress(job.progress.stage, job.progress.fraction);
  if (job.status === "succeeded") await showReport(job);
  else if (job.error) showError(job.error);
  if (!TERMINAL.has(job.status)) follow(jobId);
}

function showError(error) {
  const box = $("job-error");
  box.replaceChildren(
    el("strong", {}, `${error.type}: `),
    error.message,
    ...(error.suggestion ? [el("br"), el("em", {}, error.suggestion)] : []),
  );
  box.hidden = false;
}

// Server-Sent Events read with fetch(), so the Authorization header goes along.
async function follow(jobId) {
  const controller = new AbortController();
  followAbort = controller;
  try {
    const response = await api(`v1/jobs/${encodeURIComponent(jobId)}/events`, {
      headers: { Accept: "text/event-stream" },
      signal: controller.signal,
    });
    if (!response.body || !response.body.getReader) throw new Error("no streaming in this browser");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        onEvent(jobId, buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  } catch (error) {
    if (controller.signal.aborted) return;
    // No stream (a proxy buffering it, an old browser): poll instead.
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
  if (!controller.signal.aborted && jobId === selectedJob) {
    showJob(jobId); // the stream ends with the job: show the outcome (or poll again)
    loadJobs();
  }
}

function onEvent(jobId, block) {
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) type = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trim());
  }
  if (!data.length || jobId !== selectedJob) return;
  const payload = JSON.parse(data.join("\n"));
  if (type === "progress") showProgress(payload.stage, payload.fraction);
  else if (type === "stage") showProgress(payload.data.stage, 0);
  $("detail-status").textContent = type === "progress" || type === "stage" ? "running" : type;
}

// -- the report --------------------------------------------------------------------------------
async function showReport(job) {
  let report = {};
  try {
    report = await (await api(`v1/jobs/${encodeURIComponent(job.id)}/artifacts/report.json`)).json();
  } catch (error) {
    showError({ type: "ReportUnavailable", message: error.message, suggestion: error.suggestion });
  }
  const metrics = job.metrics || {};
  const validation = report.validation || {};
  const info = report.info || {};
  const original = metrics.original_size_bytes ?? validation.original_size_bytes ?? info.original_size_bytes;
  const quantized = metrics.quantized_size_bytes ?? validation.quantized_size_bytes ?? info.quantized_size_bytes;
  const ratio = metrics.compression_ratio ?? validation.compression_ratio;
  fill($("sizes"), [
    ["Before", bytes(original)],
    ["After", bytes(quantized)],
    ["Compression", typeof ratio === "number" ? `${ratio.toFixed(2)}x` : "-"],
    ["Mode", `${metrics.mode ?? info.mode ?? "-"}, ${metrics.bits ?? info.bits ?? "?"} bits`],
    ["Layers quantized / kept", `${metrics.selected_layers ?? "-"} / ${metrics.skipped_layers ?? "-"}`],
  ]);
  const passed = metrics.validation_passed ?? validation.passed;
  const measured = report.accuracy || {};
  fill($("accuracy"), [
    ...textAccuracy(metrics, measured),
    ["Validation", passed === undefined ? "not run" : passed ? "passed" : "failed"],
    ["Output SQNR", number(metrics.output_sqnr_db ?? validation.output_sqnr_db, 2, "dB")],
    ["Output cosine", number(metrics.output_cosine ?? validation.output_cosine, 4)],
    ["Mean weight SQNR", number(metrics.mean_weight_sqnr_db ?? validation.mean_weight_sqnr_db, 2, "dB")],
    ["Min weight SQNR", number(validation.min_weight_sqnr_db, 2, "dB")],
  ]);
  drawChart($("sqnr-chart"), validation.layer_sqnr_db || {});
  $("artifacts").replaceChildren(...job.artifacts.map((artifact) => artifactItem(job.id, artifact)));
  $("report").dataset.jobId = job.id;
  $("report").hidden = false;
}

// Figures on text (eval upload or held-out calibration): only the rows the job measured.
function textAccuracy(metrics, measured) {
  const rows = [];
  const before = metrics.perplexity_before ?? measured.perplexity_before;
  const after = metrics.perplexity_after ?? measured.perplexity_after;
  if (typeof before === "number" && typeof after === "number") {
    const change = metrics.perplexity_change_pct ?? measured.perplexity_change_pct;
    const sign = change >= 0 ? "+" : "";
    rows.push(["Perplexity before / after", `${number(before, 2)} / ${number(after, 2)} (${sign}${number(change, 1)}%)`]);
  }
  const cosine = metrics.embedding_cosine_mean ?? measured.embedding_cosine_mean;
  if (typeof cosine === "number") {
    const low = metrics.embedding_cosine_min ?? measured.embedding_cosine_min;
    rows.push(["Embedding cosine (mean / min)", `${number(cosine, 4)} / ${number(low, 4)}`]);
  }
  if (measured.source) {
    rows.push(["Measured on", `${measured.source}: ${measured.windows} x ${measured.seq_len} tokens`]);
  }
  return rows;
}

function fill(list, rows) {
  list.replaceChildren(...rows.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
}

// A horizontal bar per layer, drawn as inline SVG (no chart library).
function drawChart(container, layerSqnr) {
  const entries = Object.entries(layerSqnr).filter(([, value]) => typeof value === "number");
  if (!entries.length) {
    container.replaceChildren(el("p", { class: "muted" }, "No per-layer figures (validation was not run)."));
    return;
  }
  const rowHeight = 22;
  const labelWidth = 220;
  const width = 720;
  const barSpace = width - labelWidth - 70;
  const top = Math.max(...entries.map(([, value]) => value), 1);
  // The HTML parser puts <svg> in the SVG namespace: no namespace URI to spell out here.
  const holder = document.createElement("div");
  holder.innerHTML = "<svg></svg>";
  const svg = holder.firstChild;
  const SVG = svg.namespaceURI;
  svg.setAttribute("viewBox", `0 0 ${width} ${entries.length * rowHeight + 10}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "weight SQNR per layer, in dB");
  const make = (tag, attrs, text) => {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  make("line", { class: "axis", x1: labelWidth, x2: labelWidth, y1: 0, y2: entries.length * rowHeight + 5 });
  entries.forEach(([layer, value], index) => {
    const y = index * rowHeight + 5;
    const length = Math.max((Math.max(value, 0) / top) * barSpace, 1);
    make("text", { class: "label", x: labelWidth - 6, y: y + 14, "text-anchor": "end" }, layer);
    const bar = make("rect", { class: "bar", x: labelWidth, y: y + 3, width: length.toFixed(1), height: rowHeight - 8 });
    bar.dataset.layer = layer;
    bar.dataset.sqnrDb = String(value);
    make("title", {}, `${layer}: ${value.toFixed(2)} dB`);
    bar.append(svg.lastChild);
    make("text", { class: "value", x: labelWidth + length + 4, y: y + 14 }, `${value.toFixed(1)} dB`);
  });
  container.replaceChildren(svg);
}

function artifactItem(jobId, artifact) {
  const link = el("a", { href: "#", textContent: artifact.name });
  link.dataset.artifact = artifact.name;
  link.addEventListener("click", (event) => {
    event.preventDefault();
    download(jobId, artifact.name);
  });
  return el(
    "li",
    { "data-artifact": artifact.name },
    link,
    ` ${bytes(artifact.size)} `,
    el("div", { class: "sha" }, `sha256 ${artifact.sha256}`),
  );
}

// Downloads need the key too: fetch the file, then save it from a blob URL.
async function download(jobId, name) {
  try {
    const response = await api(`v1/jobs/${encodeURIComponent(jobId)}/artifacts/${encodeURIComponent(name)}`);
    const blobUrl = URL.createObjectURL(await response.blob());
    const save = el("a", { href: blobUrl, download: name });
    document.body.append(save);
    save.click();
    save.remove();
    setTimeout(() => URL.revokeObjectURL(blobUrl), 60000);
  } catch (error) {
    showError({ type: "DownloadFailed", message: error.message, suggestion: error.suggestion });
  }
}

// -- start -------------------------------------------------------------------------------------
showKeyState();
loadJobs();
const fromHash = new URLSearchParams(location.hash.slice(1)).get("job");
if (fromHash) selectJob(fromHash);
