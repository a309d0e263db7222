// layertrack dashboard: plain JavaScript over the /v1 API; charts by the bundled ECharts.
"use strict";

const POLL_MS = 4000;
// The vocabulary (metrics with their labels and ranges, job statuses) comes from GET /v1/meta,
// loaded once after sign-in: the dashboard keeps no list of its own.
let META = null;
const meta = {
  all: () => META.metrics.map((m) => m.name),                            // every metric
  shown: () => META.metrics.filter((m) => m.default).map((m) => m.name),  // the ones every job measures
  label: (name) => (META.metrics.find((m) => m.name === name) || {}).label || name,
  range: (name) => (META.metrics.find((m) => m.name === name) || {}).range || [null, null],
  kind: (name) => (META.metrics.find((m) => m.name === name) || {}).kind || "pair",  // "pair": block i → i+1; "layer": h_i
  statuses: () => META.job_statuses,
  defaultMetric: () => META.default_metric,
  // what the signed-in token may do (scopes read, submit, admin): Retry and Cancel need submit
  can: (scope) => ((META.token || {}).scopes || []).includes(scope),
};
// Okabe & Ito: distinguishable with colour-vision deficiencies
const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"];
const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"];

const app = document.getElementById("app");
const charts = {};            // name -> ECharts instance (also read by the browser tests)
window.layertrackCharts = charts;
let timer = null;
let refresh = null;

// ------------------------------------------------------------------ API
function token() { return localStorage.getItem("layertrack_token"); }

// A run name may contain "/" (org/llama-350m): each part is encoded, the separators kept, so
// /v1/runs/org/llama-350m/trend and /runs/org/llama-350m are what the server routes.
function runPath(name) { return String(name).split("/").map(encodeURIComponent).join("/"); }
function runApi(name, rest = "") { return `/v1/runs/${runPath(name)}${rest}`; }
function runLink(name) { return `/runs/${runPath(name)}`; }
function jobLink(id) { return `/jobs/${encodeURIComponent(id)}`; }
function fileName(s) { return String(s).replace(/[^A-Za-z0-9._-]+/g, "_"); }

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${token()}` }, options.headers || {});
  const r = await fetch(path, Object.assign({}, options, { headers }));
  if (r.status === 401) { localStorage.removeItem("layertrack_token"); showLogin("That token was refused: " + (await detail(r))); throw new Error("unauthorized"); }
  if (!r.ok) throw new Error(await detail(r));
  const type = r.headers.get("content-type") || "";
  return type.includes("json") ? r.json() : r.blob();
}

async function detail(r) {
  try { const body = await r.json(); return body.detail || body.title || r.statusText; } catch { return r.statusText; }
}

function esc(s) { return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }
function fmt(v, digits = 4) { return v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits); }
function when(t) { return t ? new Date(t.endsWith("Z") || t.includes("+") ? t : t + "Z").toLocaleString() : "–"; }
function setStatus(text) { document.getElementById("status").textContent = text; }

function chart(id, name) {
  const el = document.getElementById(id);
  const existing = echarts.getInstanceByDom(el);
  charts[name] = existing || echarts.init(el, null, { renderer: "canvas" });
  return charts[name];
}

// ------------------------------------------------------------------ shell
function showLogin(message) {
  stop();
  app.innerHTML = `<form class="login" id="login">
    <h1>Sign in</h1>
    <p class="muted">Paste an API token. <code>layertrack up</code> saved the first one in
      <code>$LAYERTRACK_DATA_DIR/client.json</code> (by default <code>~/.local/share/layertrack/client.json</code>);
      or create one with <code>layertrack token create NAME</code>. It stays in this browser.</p>
    ${message ? `<p class="error">${esc(message)}</p>` : ""}
    <input id="token-input" type="password" autocomplete="off" placeholder="lt_..." required aria-label="API token">
    <button type="submit">Open the dashboard</button></form>`;
  document.getElementById("login").addEventListener("submit", (e) => {
    e.preventDefault();
    META = null;  // the vocabulary holds what the token may do: ask again with the new one
    localStorage.setItem("layertrack_token", document.getElementById("token-input").value.trim());
    route();
  });
}

function stop() { if (timer) clearInterval(timer); timer = null; refresh = null; }

function every(fn) {
  refresh = fn;
  timer = setInterval(async () => {
    try { await fn(); setStatus("updated " + new Date().toLocaleTimeString()); }
    catch (e) { if (e.message !== "unauthorized") setStatus("update failed: " + e.message); }
  }, POLL_MS);
}

async function route() {
  stop();
  Object.keys(charts).forEach((k) => { charts[k].dispose(); delete charts[k]; });
  document.getElementById("logout").hidden = !token();
  if (!token()) return showLogin();
  const path = location.pathname;
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active",
    (a.dataset.nav === "runs" && (path === "/" || path.startsWith("/runs/"))) || path === "/" + a.dataset.nav
    || (a.dataset.nav === "jobs" && path.startsWith("/jobs/"))));
  try {
    if (!META) META = await api("/v1/meta");
    if (path.startsWith("/runs/")) await runPage(path.slice(6).split("/").map(decodeURIComponent).join("/"));
    else if (path === "/jobs") await jobsPage();
    else if (path.startsWith("/jobs/")) await jobPage(decodeURIComponent(path.slice(6)));
    else if (path === "/compare") await comparePage();
    else await runsPage();
    setStatus("updated " + new Date().toLocaleTimeString());
  } catch (e) {
    if (e.message !== "unauthorized") app.innerHTML = `<p class="error" id="page-error">${esc(e.message)}</p>`;
  }
}

document.getElementById("logout").addEventListener("click", () => { localStorage.removeItem("layertrack_token"); META = null; route(); });
window.addEventListener("resize", () => Object.values(charts).forEach((c) => c.resize()));

// ------------------------------------------------------------------ runs
async function runsPage() {
  const q = new URLSearchParams(location.search).get("name") || "";
  app.innerHTML = `<h1>Runs</h1>
    <div class="controls"><label for="run-filter">Filter by name</label>
      <input id="run-filter" type="search" value="${esc(q)}" placeholder="part of a run name"></div>
    <table id="runs"><thead><tr><th>run</th><th>phase</th><th>parent</th><th class="num">last step</th>
      ${meta.statuses().map((s) => `<th class="num">${esc(s)}</th>`).join("")}<th>last activity</th></tr></thead><tbody></tbody></table>`;
  const input = document.getElementById("run-filter");
  const load = async () => {
    const name = input.value.trim();
    const runs = await api("/v1/runs" + (name ? "?name=" + encodeURIComponent(name) : ""));
    document.querySelector("#runs tbody").innerHTML = runs.length ? runs.map((r) => `<tr data-run="${esc(r.name)}">
      <td><a href="${runLink(r.name)}">${esc(r.name)}</a></td><td>${esc(r.phase)}</td>
      <td>${r.parent_run ? `<a href="${runLink(r.parent_run)}">${esc(r.parent_run)}</a> @ ${r.parent_step ?? "?"}` : "–"}</td>
      <td class="num">${r.last_step ?? "–"}</td>
      ${meta.statuses().map((s) => `<td class="num">${r.jobs[s] ?? 0}</td>`).join("")}
      <td>${when(r.last_activity)}</td></tr>`).join("")
      : `<tr><td colspan="${5 + meta.statuses().length}" class="muted">no runs${name ? " match" : " yet: post a checkpoint"}</td></tr>`;
  };
  input.addEventListener("input", () => { history.replaceState(null, "", input.value ? "/?name=" + encodeURIComponent(input.value) : "/"); load(); });
  await load();
  every(load);
}

// ------------------------------------------------------------------ one run
// The y-axis of a metric's chart: the data's extent with a little margin, on round numbers,
// never beyond the values the metric can take (/v1/meta's range): a flat linearity series at
// 1.0 gets an axis up to 1, not 1.6.
function yBounds(metric, series) {
  const values = series.flatMap((s) => (s.data || []).map((d) => (Array.isArray(d) ? d[1] : d)))
    .filter((v) => v !== null && v !== undefined && Number.isFinite(v));
  const [lo, hi] = meta.range(metric);
  if (!values.length) return lo !== null && hi !== null ? { min: lo, max: hi } : {};
  let min = Math.min(...values), max = Math.max(...values);
  const span = max - min || Math.max(Math.abs(max) * 0.1, 1e-3);
  const step = Math.pow(10, Math.floor(Math.log10(span / 4)));
  min = Math.floor((min - span * 0.05) / step) * step;
  max = Math.ceil((max + span * 0.05) / step) * step;
  if (lo !== null) min = Math.max(lo, min);
  if (hi !== null) max = Math.min(hi, max);
  const digits = Math.max(0, -Math.floor(Math.log10(step)));
  return { min: Number(min.toFixed(digits)), max: Number(max.toFixed(digits)) };
}

function lineOption(title, yName, series, { logX = false, xName = "training step", metric = null } = {}) {
  return {
    color: PALETTE, animation: false,
    title: { text: title, left: 8, top: 4, textStyle: { fontSize: 13 } },
    tooltip: { trigger: "axis", valueFormatter: (v) => fmt(v, 5) },
    legend: { top: 4, right: 8, textStyle: { fontSize: 11 } },
    grid: { left: 64, right: 20, top: 40, bottom: 48 },
    xAxis: { type: logX ? "log" : "value", name: xName, nameLocation: "middle", nameGap: 28, scale: true },
    yAxis: Object.assign({ type: "value", name: yName, nameLocation: "middle", nameGap: 48, scale: true },
      metric ? yBounds(metric, series) : {}),
    series,
  };
}

// the metrics between checkpoints, shown in the run page's dynamics view
const DYNAMICS = ["drift_cka", "weight_update"];

// A step × layer heatmap of one metric (GET /heatmap's answer): rows are blocks i → i+1 for a
// per-pair metric, hidden states h_i for a per-layer one; the final-norm pair is left out
// unless keepFinalNorm (its linearity is another kind of map; its weights are not).
function heatmapOption(h, metric, offset, { keepFinalNorm = false } = {}) {
  const perLayer = meta.kind(metric) === "layer";
  const keep = h.layers.map((l, j) => [l, j]).filter(([l]) => keepFinalNorm || !h.final_norm_layers.includes(l));
  const rowName = (l) => perLayer ? `h${l}` : `${l}→${l + 1}`;
  const data = [];
  h.steps.forEach((s, i) => keep.forEach(([, j], k) => data.push([i, k, h.values[i][j]])));
  const vals = data.map((d) => d[2]).filter((v) => v !== null);
  const lo = vals.length ? Math.min(...vals) : 0, hi = vals.length ? Math.max(...vals) : 1;
  return {
    animation: false,
    title: { text: `${metric} per ${perLayer ? "hidden state" : "block"} and step`, left: 8, top: 4, textStyle: { fontSize: 13 } },
    tooltip: { formatter: (p) => `step ${h.steps[p.data[0]] + offset}<br>${perLayer ? "hidden state" : "block"} ${rowName(keep[p.data[1]][0])}<br>${metric} ${fmt(p.data[2], 5)}` },
    grid: { left: 72, right: 90, top: 40, bottom: 56 },
    xAxis: { type: "category", data: h.steps.map((s) => String(s + offset)), name: "training step", nameLocation: "middle", nameGap: 34 },
    yAxis: { type: "category", data: keep.map(([l]) => rowName(l)), name: perLayer ? "hidden state" : "block", nameLocation: "middle", nameGap: 52 },
    visualMap: { min: lo, max: hi, calculable: false, orient: "vertical", right: 10, top: "middle", itemHeight: 220, inRange: { color: VIRIDIS }, text: [fmt(hi, 3), fmt(lo, 3)] },
    series: [{ type: "heatmap", name: metric, data, emphasis: { itemStyle: { borderColor: "#000", borderWidth: 1 } } }],
  };
}

async function runPage(name) {
  const run = await api(runApi(name));
  const METRICS = meta.shown();
  const offset = run.parent_run ? (run.parent_step || 0) : 0;
  app.innerHTML = `<h1>${esc(run.name)} <span class="pill">${esc(run.phase)}</span></h1>
    <p class="muted">${run.parent_run ? `fine-tuned from <a href="${runLink(run.parent_run)}">${esc(run.parent_run)}</a> at step ${run.parent_step}; steps are shown continuing from there. ` : ""}
      last step ${run.last_step ?? "–"} · ${run.n_checkpoints} checkpoints · jobs: ${Object.entries(run.jobs).filter(([, n]) => n).map(([s, n]) => `${n} ${s}`).join(", ") || "none"}</p>
    <div class="controls">
      <label><input id="logx" type="checkbox"> log-scaled step axis</label>
      <label for="metric">metric for the heatmap and the profile</label>
      <select id="metric">${meta.all().map((m) => `<option value="${esc(m)}" title="${esc(meta.label(m))}">${esc(m)}</option>`).join("")}</select>
      <button id="png" type="button">Download PNGs</button><button id="svg" type="button">Download SVGs</button>
      ${deleteButton()}
    </div>
    <p id="run-error" class="error" role="alert"></p>
    <dialog id="delete-dialog" aria-labelledby="delete-title">
      <form method="dialog"><h2 id="delete-title">Delete run ${esc(run.name)}?</h2>
        <p id="delete-what" class="muted">counting what would be deleted…</p>
        <p>This cannot be undone.</p>
        <div class="controls"><button id="delete-confirm" class="danger" type="button" disabled>Delete</button>
          <button id="delete-keep" type="submit" value="keep">Keep it</button></div></form></dialog>
    <h2>Layer mean per step</h2>
    <div class="grid" id="trends">${METRICS.map((m) => `<div class="chart" id="trend-${m}" data-metric="${m}"></div>`).join("")}</div>
    <h2>Step × layer</h2><div class="chart tall" id="heatmap"></div>
    <h2>Dynamics: change since the previous checkpoint</h2>
    <p class="muted" id="dynamics-note">Each step against the run's previous scored checkpoint (a fine-tune's first step against its parent): drift_cka per hidden state (1 − linear CKA of its representation on the probe), weight_update per block (‖W − W_prev‖ / ‖W_prev‖). Layers that have settled stay dark.</p>
    <div class="grid" id="dynamics">${DYNAMICS.map((m) => `<div class="chart tall" id="dyn-${m}" data-metric="${m}"></div>`).join("")}</div>
    <h2>Per-layer profile</h2>
    <div class="controls"><label for="profile-step">step</label><select id="profile-step"></select>
      <label for="compare-step">compare with</label><select id="compare-step"><option value="">(none)</option></select>
      <span class="muted">Click a point of a trend or a heatmap cell to pick the step.</span></div>
    <div class="chart" id="profile"></div>`;
  const state = { metric: meta.defaultMetric(), step: null, compare: null, steps: [] };
  document.getElementById("metric").value = state.metric;

  const drawTrends = async () => {
    const logX = document.getElementById("logx").checked;
    const firings = await api(runApi(name, "/alerts/firings"));
    const rules = firings.length ? await api(runApi(name, "/alerts")) : [];
    const ruleMetric = Object.fromEntries(rules.filter((r) => r.layer === null).map((r) => [r.id, r.metric]));
    await Promise.all(METRICS.map(async (m) => {
      const t = await api(runApi(name, `/trend?metric=${m}&max_points=1000`));
      const series = [];
      if (run.parent_run) {
        const p = await api(runApi(run.parent_run, `/trend?metric=${m}&max_points=1000&to_step=${offset}`));
        series.push({ name: `${run.parent_run} (parent)`, type: "line", symbolSize: 3, color: "#999999", data: p.steps.map((s, i) => [Math.max(s, logX ? 1 : s), p.values[i]]) });
      }
      const mine = firings.filter((f) => ruleMetric[f.rule_id] === m);
      series.push({
        name: run.name, type: "line", symbolSize: 6, data: t.steps.map((s, i) => [s + offset, t.values[i]]),
        markPoint: mine.length ? { symbol: "pin", symbolSize: 34, itemStyle: { color: "#D55E00" },
          data: mine.map((f) => ({ name: "alert", coord: [f.step + offset, f.value], value: "!", tooltip: { formatter: esc(f.message) } })) } : undefined,
      });
      const c = chart(`trend-${m}`, `trend-${m}`);
      c.setOption(lineOption(m, meta.label(m), series, { logX, metric: m, xName: run.parent_run ? "training step (parent's steps, then fine-tuning)" : "training step" }), { notMerge: true });
      c.off("click");
      c.on("click", (params) => { if (params.seriesName === run.name && Array.isArray(params.data)) pickStep(params.data[0] - offset); });
    }));
  };

  const drawHeatmap = async () => {
    const h = await api(runApi(name, `/heatmap?metric=${state.metric}&max_steps=300`));
    const c = chart("heatmap", "heatmap");
    c.setOption(heatmapOption(h, state.metric, offset), { notMerge: true });
    c.off("click");
    c.on("click", (p) => pickStep(h.steps[p.data[0]]));
  };

  // the dynamics view: step × layer of drift_cka and weight_update (every block kept: the
  // final-norm flag is about the linearity of the last map, not about its weights)
  const drawDynamics = async () => {
    let measured = 0;
    await Promise.all(DYNAMICS.map(async (m) => {
      const h = await api(runApi(name, `/heatmap?metric=${m}&max_steps=300`));
      measured += h.steps.length;
      const c = chart(`dyn-${m}`, `dyn-${m}`);
      const opt = heatmapOption(h, m, offset, { keepFinalNorm: true });
      if (!h.steps.length) opt.title.text = `${m}: not measured for this run yet`;
      c.setOption(opt, { notMerge: true });
      c.off("click");
      c.on("click", (p) => pickStep(h.steps[p.data[0]]));
    }));
    document.getElementById("dynamics").dataset.steps = String(measured);
  };

  const drawProfile = async () => {
    const available = await api(runApi(name, `/profile?metric=${state.metric}`));
    state.steps = available.available_steps;
    if (!state.steps.length) { chart("profile", "profile").setOption(lineOption("no scores yet", "", []), { notMerge: true }); return; }
    if (state.step === null || !state.steps.includes(state.step)) state.step = state.steps[state.steps.length - 1];
    const ps = document.getElementById("profile-step"), cs = document.getElementById("compare-step");
    ps.innerHTML = state.steps.map((s) => `<option value="${s}">${s + offset}</option>`).join("");
    cs.innerHTML = `<option value="">(none)</option>` + state.steps.map((s) => `<option value="${s}">${s + offset}</option>`).join("");
    ps.value = String(state.step);
    cs.value = state.compare === null ? "" : String(state.compare);
    const steps = [state.step, ...(state.compare !== null && state.compare !== state.step ? [state.compare] : [])];
    const p = await api(runApi(name, `/profile?metric=${state.metric}&${steps.map((s) => "step=" + s).join("&")}`));
    const keep = p.layers.map((l, j) => [l, j]).filter(([l]) => !p.final_norm_layers.includes(l));
    const series = p.steps.map((s, k) => ({ name: `step ${s + offset}`, type: "line", symbolSize: 7, data: keep.map(([l, j]) => [l, p.values[k][j]]) }));
    const c = chart("profile", "profile");
    const opt = lineOption(`${state.metric} per block`, meta.label(state.metric), series, { xName: "block i (hidden state i → i+1)", metric: state.metric });
    opt.xAxis.minInterval = 1;
    c.setOption(opt, { notMerge: true });
    document.getElementById("profile").dataset.step = String(state.step);
  };

  const pickStep = (s) => { state.step = s; drawProfile(); };
  document.getElementById("logx").addEventListener("change", drawTrends);
  document.getElementById("metric").addEventListener("change", (e) => { state.metric = e.target.value; drawHeatmap(); drawProfile(); });
  document.getElementById("profile-step").addEventListener("change", (e) => pickStep(Number(e.target.value)));
  document.getElementById("compare-step").addEventListener("change", (e) => { state.compare = e.target.value === "" ? null : Number(e.target.value); drawProfile(); });
  for (const kind of ["png", "svg"]) {
    document.getElementById(kind).addEventListener("click", async () => {
      for (const [what, q] of [["trend", `metric=${state.metric}`], ["heatmap", `metric=${state.metric}`], ["profile", `metric=${state.metric}&step=${state.step}`]]) {
        const blob = await api(runApi(name, `/${what}/plot.${kind}?${q}`));
        const a = document.createElement("a");
        a.href = URL.createObjectURL(blob); a.download = `${fileName(name)}-${state.metric}-${what}.${kind}`; a.click();
      }
    });
  }
  wireDelete(name);
  const all = async () => { await drawTrends(); await drawHeatmap(); await drawDynamics(); await drawProfile(); };
  await all();
  every(all);
}

// Deleting a run (DELETE /v1/runs/{run}) needs the admin scope: without it the button is
// shown disabled, saying so. It opens a dialog that says what would go (the API's dry run)
// and deletes only when confirmed; any refusal (409: jobs still queued or running) is shown.
function deleteButton() {
  const why = meta.can("admin") ? "" : ` disabled title="needs a token with the admin scope; this one has: ${esc(((META.token || {}).scopes || []).join(", ") || "none")}"`;
  return `<button id="delete-run" class="danger" type="button"${why}>Delete run…</button>`;
}

function plural(n, one, many) { return `${n} ${n === 1 ? one : (many || one + "s")}`; }

function whatGoes(d) {
  const parts = [plural(d.jobs, "job"), plural(d.checkpoints, "checkpoint"), plural(d.scores, "score")];
  if (d.alert_rules) parts.push(`${plural(d.alert_rules, "alert rule")} with ${plural(d.alert_firings, "firing")}`);
  if (d.webhooks) parts.push(`${plural(d.webhooks, "webhook subscription")} limited to it`);
  return parts.join(", ");
}

function wireDelete(name) {
  const dialog = document.getElementById("delete-dialog"), what = document.getElementById("delete-what");
  const confirmButton = document.getElementById("delete-confirm"), shown = document.getElementById("run-error");
  document.getElementById("delete-run").addEventListener("click", async () => {
    confirmButton.disabled = true;
    what.textContent = "counting what would be deleted…";
    dialog.showModal();
    try {
      const d = await api(runApi(name, "?dry_run=true"), { method: "DELETE" });
      let text = `This deletes ${whatGoes(d)}.`;
      if (d.child_runs.length) text += ` Its fine-tunes (${d.child_runs.join(", ")}) stay, without a parent.`;
      if (d.active_jobs.length) text += ` ${plural(d.active_jobs.length, "job is", "jobs are")} still queued or running: cancel them on the Jobs page first.`;
      what.textContent = text;
      confirmButton.disabled = d.active_jobs.length > 0;
    } catch (err) { what.textContent = `cannot delete it: ${err.message}`; }
  });
  confirmButton.addEventListener("click", async () => {
    confirmButton.disabled = true;
    try {
      const d = await api(runApi(name), { method: "DELETE" });
      dialog.close();
      stop();
      history.pushState(null, "", "/");
      await route();
      setStatus(`deleted run ${d.run}: ${whatGoes(d)}`);
    } catch (err) {
      dialog.close();
      shown.textContent = `delete refused: ${err.message}`;
    }
  });
}

// ------------------------------------------------------------------ jobs
// a remote checkpoint's progress (GET /v1/jobs: progress.phase fetching | waiting | retrying | scoring)
function mib(n) {
  for (const [unit, k] of [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]]) if (n >= k) return (n / k).toFixed(1) + " " + unit;
  return n + " B";
}
function progressText(j) {
  const p = j.progress;
  if (!p || !["queued", "running"].includes(j.status)) return "";
  if (p.phase === "fetching" && p.bytes_total) {
    const done = p.bytes_done || 0;
    return `fetching ${mib(done)} / ${mib(p.bytes_total)} (${Math.floor(100 * done / p.bytes_total)} %), ${(p.seconds || 0).toFixed(1)} s`;
  }
  return `${p.phase}${p.message ? ": " + p.message : ""}`;
}

async function jobsPage() {
  app.innerHTML = `<h1>Jobs</h1>
    <div class="controls"><label for="job-status">status</label>
      <select id="job-status"><option value="">all</option>${meta.statuses().map((s) => `<option>${esc(s)}</option>`).join("")}</select>
      <label for="job-run">run</label><input id="job-run" type="search" placeholder="exact run name"></div>
    <p id="jobs-error" class="error" role="alert"></p>
    <table id="jobs"><thead><tr><th>job</th><th>run</th><th class="num">step</th><th>status</th><th class="num">attempts</th>
      <th>worker</th><th class="num">duration</th><th>queued</th><th>error</th><th></th></tr></thead><tbody></tbody></table>`;
  const load = async () => {
    const status = document.getElementById("job-status").value, run = document.getElementById("job-run").value.trim();
    const q = new URLSearchParams({ limit: "200" });
    if (status) q.set("status", status);
    if (run) q.set("run", run);
    const jobs = await api("/v1/jobs?" + q);
    // Retry and Cancel need the submit scope: without it they are shown disabled, saying so
    const may = meta.can("submit") ? "" : ` disabled title="needs a token with the submit scope; this one has: ${esc(((META.token || {}).scopes || []).join(", ") || "none")}"`;
    document.querySelector("#jobs tbody").innerHTML = jobs.length ? jobs.map((j) => `<tr data-job="${j.id}" data-status="${j.status}">
      <td title="${j.id}"><a class="job-link" href="${jobLink(j.id)}"><code>${esc(j.id.slice(0, 8))}</code></a></td><td><a href="${runLink(j.run)}">${esc(j.run)}</a></td>
      <td class="num">${j.step}</td><td><span class="pill ${j.status}">${j.status}</span>${progressText(j) ? `<div class="muted job-progress">${esc(progressText(j))}</div>` : ""}</td><td class="num">${j.attempts}</td>
      <td>${esc(j.worker || "–")}</td><td class="num">${j.duration_s === null ? "–" : j.duration_s.toFixed(1) + " s"}</td>
      <td>${when(j.queued_at)}</td>
      <td class="error job-error">${j.error ? esc(`${j.error_code}: ${j.error}`) : ""}</td>
      <td>${["failed", "cancelled"].includes(j.status) ? `<button data-action="retry" data-id="${j.id}"${may}>Retry</button>` : ""}
          ${["queued", "running"].includes(j.status) ? `<button class="danger" data-action="cancel" data-id="${j.id}"${may}>Cancel</button>` : ""}</td></tr>`).join("")
      : `<tr><td colspan="10" class="muted">no jobs</td></tr>`;
  };
  document.getElementById("job-status").addEventListener("change", load);
  document.getElementById("job-run").addEventListener("change", load);
  document.getElementById("jobs").addEventListener("click", async (e) => {
    const b = e.target.closest("button[data-action]");
    if (!b) return;
    b.disabled = true;
    const shown = document.getElementById("jobs-error");
    // a refusal (403: the token lacks a scope, or the job is another token's) stays shown
    try { await api(`/v1/jobs/${b.dataset.id}/${b.dataset.action}`, { method: "POST" }); setStatus(`${b.dataset.action} sent`); shown.textContent = ""; }
    catch (err) { setStatus(`${b.dataset.action} failed: ${err.message}`); shown.textContent = `${b.dataset.action} refused: ${err.message}`; }
    await load();
  });
  await load();
  every(load);
}

// one job: everything GET /v1/jobs/{id} says, followed while it is queued or running
async function jobPage(id) {
  const show = async () => {
    const j = await api(`/v1/jobs/${encodeURIComponent(id)}`);
    const rows = [
      ["run", `<a href="${runLink(j.run)}">${esc(j.run)}</a>`], ["step", esc(j.step)], ["phase", esc(j.phase)],
      ["status", `<span class="pill ${esc(j.status)}">${esc(j.status)}</span>${progressText(j) ? ` <span class="muted">${esc(progressText(j))}</span>` : ""}`],
      ["checkpoint", `<code>${esc(j.uri)}</code>`], ["probe", esc(j.probe)],
      ["config", Object.keys(j.config || {}).length ? `<code>${esc(JSON.stringify(j.config))}</code>` : "defaults"],
      ["attempts", esc(j.attempts)], ["worker", esc(j.worker || "–")],
      ["queued", when(j.queued_at)], ["started", when(j.started_at)], ["finished", when(j.finished_at)],
      ["duration", j.duration_s === null ? "–" : `${j.duration_s.toFixed(1)} s` + (j.run_s != null ? ` (${j.run_s.toFixed(1)} s on the worker)` : "")],
      ...(j.error ? [["error", `<span class="error job-error">${esc(`${j.error_code}: ${j.error}`)}</span>`]] : []),
      ...(j.resolved_revision ? [["revision", `<code>${esc(j.resolved_revision)}</code>`]] : []),
      ...(j.content_fingerprint ? [["fingerprint", `<code>${esc(j.content_fingerprint)}</code>`]] : []),
    ];
    app.innerHTML = `<h1>Job <code id="job-id">${esc(j.id)}</code></h1>
      <p class="muted"><a href="/jobs">all jobs</a> · in the API: <code>GET ${esc(j.status_url)}</code>, <code>layertrack status ${esc(j.id)}</code></p>
      <table id="job" data-job="${esc(j.id)}" data-status="${esc(j.status)}"><tbody>
        ${rows.map(([k, v]) => `<tr><th>${k}</th><td>${v}</td></tr>`).join("")}</tbody></table>
      ${j.result ? `<h2>Result</h2><pre id="job-result">${esc(JSON.stringify(j.result, null, 2))}</pre>` : ""}`;
    return ["queued", "running"].includes(j.status);
  };
  // followed while it may still change; a finished job does not
  if (await show()) every(async () => { if (!(await show())) stop(); });
}

// ------------------------------------------------------------------ compare
async function comparePage() {
  const params = new URLSearchParams(location.search);
  app.innerHTML = `<h1>Compare runs</h1>
    <div class="controls"><label for="compare-runs">runs</label>
      <input id="compare-runs" size="50" value="${esc(params.get("runs") || "")}" placeholder="run names, comma separated">
      <label for="compare-metric">metric</label><select id="compare-metric">${meta.all().map((m) => `<option title="${esc(meta.label(m))}">${esc(m)}</option>`).join("")}</select>
      <label><input id="compare-logx" type="checkbox"> log-scaled step axis</label>
      <label><input id="compare-continue" type="checkbox" checked> fine-tunes continue from their parent's step</label></div>
    <div class="chart tall" id="compare"></div><p id="compare-error" class="error"></p>`;
  document.getElementById("compare-metric").value = params.get("metric") || meta.defaultMetric();
  const load = async () => {
    const runs = document.getElementById("compare-runs").value.split(",").map((s) => s.trim()).filter(Boolean);
    const metric = document.getElementById("compare-metric").value;
    history.replaceState(null, "", `/compare?runs=${runs.map(encodeURIComponent).join(",")}&metric=${metric}`);
    const c = chart("compare", "compare");
    if (!runs.length) { c.setOption(lineOption("pick two or more runs", meta.label(metric), [], { metric }), { notMerge: true }); return; }
    document.getElementById("compare-error").textContent = "";
    let data;
    try { data = await api(`/v1/compare?runs=${encodeURIComponent(runs.join(","))}&metric=${metric}&max_points=1000`); }
    catch (e) { document.getElementById("compare-error").textContent = e.message; return; }
    const cont = document.getElementById("compare-continue").checked;
    const series = data.runs.map((r) => {
      const off = cont && r.parent_run ? (r.parent_step || 0) : 0;
      return { name: r.run, type: "line", symbolSize: 5, data: r.steps.map((s, i) => [s + off, r.values[i]]) };
    });
    c.setOption(lineOption(`${metric}, layer mean`, meta.label(metric), series, { logX: document.getElementById("compare-logx").checked, metric }), { notMerge: true });
  };
  ["compare-runs", "compare-metric", "compare-logx", "compare-continue"].forEach((id) => document.getElementById(id).addEventListener("change", load));
  await load();
  every(load);
}

route();
