// The analytics page: per endpoint, over the chosen window, requests, success rate, latency and queue-wait
// percentiles, errors by type, recent failures, and a chart (uPlot, vendored) of requests and latency over time.
"use strict";

import { el, getJson, seconds, setupLogin } from "./common.js";

const $ = (id) => document.getElementById(id);
const charts = new Map();
let timer = null;

function percent(value) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)}%`;
}

function percentileTable(app, names, data) {
  const rows = [["latency", data.latency_s], ["queue wait", data.queue_wait_s]];
  return el("div", { class: "scroll" }, el("table", { class: "percentiles", "aria-label": `${app} percentiles` },
    el("thead", {}, el("tr", {}, el("th", { text: "" }), names.map((n) => el("th", { scope: "col", text: n })))),
    el("tbody", {}, rows.map(([label, values]) => el("tr", {}, el("th", { scope: "row", text: label }),
      names.map((n) => el("td", { "data-p": n, text: seconds(values[n]) })))))));
}

function chart(app, series, container) {
  const width = Math.max(260, container.clientWidth || 600);
  const data = [series.t, series.requests, series.latency_p50_s, series.latency_p90_s];
  const opts = {
    width, height: 200,
    title: "requests and latency",
    scales: { x: { time: true }, n: { range: (u, lo, hi) => [0, Math.max(1, hi)] },
              s: { range: (u, lo, hi) => [0, Math.max(0.001, (hi ?? 0) * 1.1)] } },
    axes: [{}, { scale: "n", label: "requests" }, { scale: "s", side: 1, label: "seconds", grid: { show: false } }],
    series: [
      {},
      { label: "requests", scale: "n", stroke: "#5470c6", fill: "rgba(84,112,198,0.25)",
        paths: uPlot.paths.bars({ size: [0.8, 40] }), points: { show: false } },
      { label: "p50 latency", scale: "s", stroke: "#2f9e44", width: 2, spanGaps: true },
      { label: "p90 latency", scale: "s", stroke: "#e8590c", width: 2, spanGaps: true, dash: [6, 4] },
    ],
  };
  const old = charts.get(app);
  if (old) old.destroy();
  const plot = new uPlot(opts, data, container);
  charts.set(app, plot);
  return plot;
}

function section(app, names, data) {
  const id = `app-${app.replace(/[^a-z0-9]+/gi, "-")}`;
  const chartBox = el("div", { class: "chart", role: "img",
    "aria-label": `${app}: requests per interval and p50/p90 latency over the window` });
  const node = el("section", { class: "card app", id, "data-app": app, "aria-labelledby": `${id}-title` },
    el("h2", { id: `${id}-title`, text: app }),
    el("dl", { class: "facts" },
      el("dt", { text: "requests" }), el("dd", { class: "requests", text: String(data.requests) }),
      el("dt", { text: "succeeded" }), el("dd", { class: "succeeded", text: String(data.succeeded) }),
      el("dt", { text: "failed" }), el("dd", { class: "failed", text: String(data.failed) }),
      el("dt", { text: "in flight" }), el("dd", { text: String(data.in_flight) }),
      el("dt", { text: "success rate" }), el("dd", { class: "success-rate", text: percent(data.success_rate) })),
    percentileTable(app, names, data),
    Object.keys(data.errors_by_type).length ? el("div", {}, el("h3", { text: "errors by type" }),
      el("ul", { class: "errors" }, Object.entries(data.errors_by_type).map(([type, n]) =>
        el("li", {}, el("code", { text: type }), ` × ${n}`)))) : null,
    data.recent_failures.length ? el("div", {}, el("h3", { text: "recent failures" }),
      el("div", { class: "scroll" }, el("table", { class: "failures" },
        el("thead", {}, el("tr", {}, ["when", "request", "error type", "error"].map((h) =>
          el("th", { scope: "col", text: h })))),
        el("tbody", {}, data.recent_failures.map((f) => el("tr", {},
          el("td", { text: new Date(f.submitted_at * 1000).toLocaleTimeString() }),
          el("td", {}, el("code", { text: f.request_id })), el("td", { text: f.error_type }),
          el("td", { text: f.error }))))))) : null,
    chartBox);
  return { node, chartBox };
}

async function load() {
  const windowS = $("window").value;
  const body = await getJson(`/ui/api/analytics?window=${encodeURIComponent(windowS)}`);
  const active = Object.entries(body.endpoints).filter(([, d]) => d.requests > 0);
  const idle = Object.entries(body.endpoints).filter(([, d]) => d.requests === 0).map(([app]) => app);
  const total = active.reduce((n, [, d]) => n + d.requests, 0);
  $("summary").textContent = `${total} requests in the window, ${active.length} endpoints active; updated `
    + `${new Date(body.window.end * 1000).toLocaleTimeString()}. Records are kept for `
    + `${seconds(body.retention_s)} (--retention).`;
  const sections = active.map(([app, data]) => ({ app, data, ...section(app, body.percentiles, data) }));
  $("apps").replaceChildren(...sections.map((s) => s.node));
  for (const s of sections) chart(s.app, s.data.series, s.chartBox);
  for (const app of [...charts.keys()]) {
    if (!active.some(([a]) => a === app)) { charts.get(app).destroy(); charts.delete(app); }
  }
  $("idle").textContent = idle.length ? `No requests in the window: ${idle.join(", ")}.` : "";
  document.body.dataset.loaded = String(Date.now());
}

function init() {
  setupLogin(() => load().catch(() => {}));
  $("window").addEventListener("change", () => load().catch(() => {}));
  $("refresh").addEventListener("click", () => load().catch(() => {}));
  $("auto").addEventListener("change", () => {
    clearInterval(timer);
    if ($("auto").checked) timer = setInterval(() => load().catch(() => {}), 5000);
  });
  window.addEventListener("resize", () => {
    for (const plot of charts.values()) plot.setSize({ width: Math.max(260, plot.root.parentNode.clientWidth),
      height: 200 });
  });
  load().catch(() => {});
}

init();
