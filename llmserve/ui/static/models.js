// Models: every alias from /models with its state, refreshed every 2 s while the view is open;
// load / unload through POST /models/{alias}/load|unload with the key from the key box.

import { call, listModels, metricValues } from "./api.js";

const REFRESH_MS = 2000;
const tbody = () => document.getElementById("models");
const pending = new Set(); // aliases with a load or unload this page sent and awaits
let notify = () => {};

function stateOf(m) {
  if (m.loading || pending.has(m.id)) return m.loaded ? "unloading" : "loading";
  if (m.loaded && !m.error) return "loaded";
  if (m.error) return "failed";
  return "not loaded";
}

function mib(bytes) {
  return bytes === null || bytes === undefined ? "" : `${(bytes / 2 ** 20).toFixed(0)} MiB`;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function row(m, loadSeconds) {
  const tr = document.createElement("tr");
  tr.dataset.alias = m.id;
  const state = stateOf(m);
  tr.dataset.state = state;
  const stateCell = cell(state, `state ${state.replace(" ", "-")}`);
  if (m.error) {
    const why = document.createElement("div");
    why.className = "why";
    why.textContent = m.error;
    stateCell.append(why);
  }
  const memory = m.memory ? [mib(m.memory.rss_bytes) && `RSS +${mib(m.memory.rss_bytes)}`,
    m.memory.gpu_bytes ? `GPU +${mib(m.memory.gpu_bytes)}` : ""].filter(Boolean).join(", ") : "";
  const load = loadSeconds[m.id];
  const since = m.loaded_at ? `at ${new Date(m.loaded_at * 1000).toLocaleTimeString()}` : "";
  const loadTime = [load ? `${load.mean.toFixed(1)} s` + (load.count > 1 ? ` (mean of ${load.count})` : "") : "",
    since].filter(Boolean).join(", ");
  const running = m.running_requests || 0;
  const waiting = (m.queued_requests || 0) + (m.waiting_for_load || 0);
  const inFlight = m.loaded || waiting ? `${running} running, ${waiting} waiting` : "";
  tr.append(cell(m.id, "alias"), cell(m.backend), cell(m.task), stateCell, cell(memory), cell(loadTime),
    cell(inFlight));
  const actions = document.createElement("td");
  actions.append(button("Load", m, "load", m.loaded || state === "loading"),
    button("Unload", m, "unload", !m.loaded || state === "unloading"));
  tr.append(actions);
  return tr;
}

function button(label, m, action, disabled) {
  const b = document.createElement("button");
  b.textContent = label;
  b.className = action;
  b.disabled = disabled;
  b.addEventListener("click", () => act(m.id, action));
  return b;
}

async function act(alias, action) {
  pending.add(alias);
  notify("");
  refresh();
  try {
    await call(`/models/${encodeURIComponent(alias)}/${action}`, { method: "POST" });
    notify(`${alias}: ${action === "load" ? "loaded" : "unloaded"}`, "info");
  } catch (err) {
    notify(`${action === "load" ? "Loading" : "Unloading"} ${alias}: ${err.message}`);
  } finally {
    pending.delete(alias);
    refresh();
  }
}

async function loadTimes() {
  try {
    const text = await (await fetch("/metrics")).text();
    const sums = metricValues(text, "llm_model_load_seconds_sum", "model");
    const counts = metricValues(text, "llm_model_load_seconds_count", "model");
    return Object.fromEntries(Object.entries(counts).filter(([, c]) => c > 0)
      .map(([alias, c]) => [alias, { mean: sums[alias] / c, count: c }]));
  } catch {
    return {};
  }
}

let refreshing = false;
let again = false;  // asked for while one was in flight: its answer may predate the change

async function refresh() {
  if (refreshing) {
    again = true;
    return;
  }
  refreshing = true;
  try {
    const [rows, times] = await Promise.all([listModels(), loadTimes()]);
    tbody().replaceChildren(...rows.map((m) => row(m, times)));
    tbody().dataset.updated = String(Date.now());
  } catch (err) {
    notify(`Model list: ${err.message}`);
  } finally {
    refreshing = false;
    if (again) {
      again = false;
      refresh();
    }
  }
}

export function startModels(showNotice) {
  notify = showNotice;
  let timer = null;
  window.addEventListener("viewchange", (e) => {
    clearInterval(timer);
    if (e.detail !== "models") return;
    refresh();
    timer = setInterval(refresh, REFRESH_MS);
  });
  window.addEventListener("keychange", () => document.body.dataset.view === "models" && refresh());
}
