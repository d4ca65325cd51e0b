// Calls to the server's own routes, with the key the user typed, and its errors as sentences.

const KEY = "llmserve.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setApiKey(value) {
  if (value) sessionStorage.setItem(KEY, value);
  else sessionStorage.removeItem(KEY);
}

/** An error answer of the server: its status, and the OpenAI-shaped body's fields. */
export class ServerError extends Error {
  constructor(status, body, retryAfter) {
    const err = (body && body.error) || {};
    super(describe(status, err, retryAfter));
    this.status = status;
    this.param = err.param || null;
    this.code = err.code || null;
  }

  static async of(response) {
    const text = await response.text();
    let body;
    try {
      body = JSON.parse(text);
    } catch {
      body = { error: { message: text.trim() || response.statusText } };
    }
    return new ServerError(response.status, body, response.headers.get("retry-after"));
  }
}

/** "400 Bad request (max_tokens): ..." rather than a status code alone. */
export function describe(status, err, retryAfter) {
  const message = err.message || "no message";
  const field = err.param ? ` (field \`${err.param}\`)` : "";
  switch (status) {
    case 400:
    case 422:
      return `${status} Bad request${field}: ${message}`;
    case 401:
      return `401 Unauthorized: ${message} Enter the key in the API key box at the top.`;
    case 403:
      return `403 Forbidden: ${message}`;
    case 404:
      return `404 Not found: ${message}`;
    case 429:
      return `429 Too many requests: ${message}` + (retryAfter ? ` Try again in ${retryAfter} s.` : "");
    default:
      return status ? `${status} Server error: ${message}` : message;
  }
}

/** fetch() with the key; resolves to the Response when it is 2xx, throws a ServerError if not. */
export async function call(path, { method = "GET", body, signal } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await ServerError.of(response);
  return response;
}

export async function listModels() {
  return (await (await call("/models")).json()).data;
}

/** Reads a Server-Sent Events body, calling onEvent with each `data:` payload parsed as JSON. */
export async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

/** Sums a Prometheus text sample over its labels, or per label value when `by` is given. */
export function metricValues(text, name, by) {
  const out = by ? {} : 0;
  let total = 0;
  const pattern = new RegExp(`^${name}(?:\\{([^}]*)\\})?\\s+(\\S+)`, "gm");
  for (const [, labels = "", value] of text.matchAll(pattern)) {
    const v = Number(value);
    if (!by) {
      total += v;
      continue;
    }
    const m = labels.match(new RegExp(`${by}="([^"]*)"`));
    if (m) out[m[1]] = (out[m[1]] || 0) + v;
  }
  return by ? out : total;
}
