// Live: every second, tokens/s and running requests from /metrics and waiting requests from
// /models, kept for the last minutes and drawn as two charts. Sampling runs whatever view is
// open, so the chart already has a history when it is opened.

import { drawChart } from "./chart.js";
import { call, metricValues } from "./api.js";

const PERIOD_MS = 1000;
const KEEP = 300; // samples: five minutes
const samples = { tps: [], running: [], waiting: [] };
let last = null; // { t, tokens }
let peak = 0;
let reported = false;
let notify = () => {};

const $ = (id) => document.getElementById(id);

async function sample() {
  let text;
  let rows = [];
  try {
    text = await (await fetch("/metrics")).text();
  } catch (err) {
    if (!reported) notify(`Live view: /metrics did not answer (${err.message})`);
    reported = true;
    return;
  }
  try {
    rows = (await (await call("/models")).json()).data;
  } catch {
    // without a key that opens /models, waiting requests read as 0; the chat and models views say why
  }
  const now = performance.now();
  const tokens = metricValues(text, "llm_generation_tokens_total");
  const running = metricValues(text, "llm_requests_running");
  const waiting = rows.reduce((n, m) => n + (m.queued_requests || 0) + (m.waiting_for_load || 0), 0);
  // a counter that went down means the server restarted: start the rate over
  const tps = last && tokens >= last.tokens ? ((tokens - last.tokens) * 1000) / (now - last.t) : 0;
  last = { t: now, tokens };
  push(samples.tps, tps);
  push(samples.running, running);
  push(samples.waiting, waiting);
  peak = Math.max(peak, tps);
  $("now-tps").textContent = tps.toFixed(1);
  $("peak-tps").textContent = peak.toFixed(1);
  $("now-running").textContent = String(running);
  $("now-waiting").textContent = String(waiting);
  $("total-tokens").textContent = String(tokens);
  $("chart-tps").dataset.samples = String(samples.tps.length);
  if (document.body.dataset.view === "live") draw();
}

function push(values, v) {
  values.push(v);
  if (values.length > KEEP) values.shift();
}

function draw() {
  const seconds = (Math.max(samples.tps.length, 2) - 1) * (PERIOD_MS / 1000);
  drawChart($("chart-tps"), [{ values: samples.tps, color: "#1f5fbf" }], seconds);
  drawChart($("chart-requests"), [
    { values: samples.running, color: "#2e8b57" },
    { values: samples.waiting, color: "#d2691e" },
  ], seconds, { counts: true });
}

export function startLive(showNotice) {
  notify = showNotice;
  sample();
  setInterval(sample, PERIOD_MS);
  window.addEventListener("viewchange", (e) => e.detail === "live" && draw());
}
