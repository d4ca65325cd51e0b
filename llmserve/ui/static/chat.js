// Chat: one conversation (kept in sessionStorage until cleared), streamed from
// /v1/chat/completions token by token. Stop aborts the fetch, which closes the connection: the
// server ends the generation when its client leaves.

import { call, listModels, readEvents } from "./api.js";

const STORE = "llmserve.conversation";
const $ = (id) => document.getElementById(id);

let conversation = JSON.parse(sessionStorage.getItem(STORE) || "[]");
let controller = null;
let notify = () => {};

function save() {
  sessionStorage.setItem(STORE, JSON.stringify(conversation));
}

function bubble(role, text) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  el.append(body);
  $("messages").append(el);
  return el;
}

function render() {
  $("messages").replaceChildren();
  for (const m of conversation) {
    const el = bubble(m.role, m.content);
    if (m.stats) addStats(el, m.stats);
    if (m.error) addError(el, m.error);
  }
}

function addStats(el, stats) {
  const line = document.createElement("div");
  line.className = "stats";
  line.textContent = stats;
  el.append(line);
}

function addError(el, message) {
  const line = document.createElement("div");
  line.className = "error";
  line.textContent = message;
  el.append(line);
}

function statsLine(s) {
  const parts = [];
  if (s.ttft !== null) parts.push(`TTFT ${(s.ttft / 1000).toFixed(2)} s`);
  const tokens = s.usage ? s.usage.completion_tokens : s.chunks;
  const seconds = s.ttft === null ? 0 : (s.end - s.start - s.ttft) / 1000;
  if (tokens > 1 && seconds > 0) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tokens/s`);
  if (s.usage) {
    parts.push(`${s.usage.prompt_tokens} prompt + ${s.usage.completion_tokens} completion tokens`);
  } else {
    parts.push(`${s.chunks} tokens received`);
  }
  if (s.finish) parts.push(`finish: ${s.finish}`);
  if (s.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function request(alias) {
  const body = {
    model: alias,
    messages: [],
    stream: true,
    stream_options: { include_usage: true },
  };
  const system = $("system").value.trim();
  if (system) body.messages.push({ role: "system", content: system });
  for (const m of conversation) {
    if (!m.error || m.content) body.messages.push({ role: m.role, content: m.content });
  }
  // the fields go as typed: the server, not the page, says which values it takes
  if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
  if ($("max-tokens").value !== "") body.max_tokens = Number($("max-tokens").value);
  const extra = $("extra").value.trim();
  if (extra) Object.assign(body, JSON.parse(extra));
  return body;
}

async function send(text) {
  const alias = $("alias").value;
  let body;
  try {
    conversation.push({ role: "user", content: text });
    body = request(alias);
  } catch (err) {
    conversation.pop();
    notify(`More request fields: not valid JSON (${err.message})`);
    return;
  }
  notify("");
  save();
  bubble("user", text);
  const reply = { role: "assistant", content: "" };
  const el = bubble("assistant", "");
  el.dataset.chunks = "0";
  el.classList.add("streaming");
  const textEl = el.querySelector(".text");
  const s = { start: performance.now(), end: 0, ttft: null, chunks: 0, usage: null, finish: null, stopped: false };
  controller = new AbortController();
  setBusy(true);
  try {
    const response = await call("/v1/chat/completions", { method: "POST", body, signal: controller.signal });
    await readEvents(response, (event) => {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) s.usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) return;
      if (choice.finish_reason) s.finish = choice.finish_reason;
      const piece = choice.delta && choice.delta.content;
      if (!piece) return;
      if (s.ttft === null) s.ttft = performance.now() - s.start;
      s.chunks += 1;
      reply.content += piece;
      textEl.textContent = reply.content;
      el.dataset.chunks = String(s.chunks);
      $("messages").scrollTop = $("messages").scrollHeight;
    });
  } catch (err) {
    if (err.name === "AbortError") {
      s.stopped = true;
    } else {
      reply.error = err.message;
      addError(el, err.message);
      notify(err.message);
    }
  } finally {
    s.end = performance.now();
    controller = null;
    setBusy(false);
    el.classList.remove("streaming");
  }
  if (reply.content || s.stopped) {
    reply.stats = statsLine(s);
    addStats(el, reply.stats);
  }
  el.dataset.state = s.stopped ? "stopped" : reply.error ? "error" : "done";
  conversation.push(reply);
  save();
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function fillAliases() {
  const select = $("alias");
  const chosen = select.value;
  try {
    const rows = (await listModels()).filter((m) =>
      m.capabilities ? m.capabilities.includes("chat") : m.task === "generate");
    select.replaceChildren(...rows.map((m) => new Option(`${m.id} (${m.backend})`, m.id)));
    const loaded = rows.find((m) => m.loaded);
    select.value = rows.some((m) => m.id === chosen) ? chosen : loaded ? loaded.id : rows.length ? rows[0].id : "";
    select.dataset.ready = "true";
  } catch (err) {
    notify(`Model list: ${err.message}`);
  }
}

export function startChat(showNotice) {
  notify = showNotice;
  render();
  fillAliases();
  window.addEventListener("keychange", fillAliases);
  window.addEventListener("viewchange", (e) => e.detail === "chat" && fillAliases());
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", () => {
    if (controller) controller.abort();
    conversation = [];
    save();
    render();
  });
}
