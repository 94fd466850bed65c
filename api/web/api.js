// The REST client of the page: the API key (kept in this tab's sessionStorage, sent only as a Bearer header),
// JSON requests with the API's one error shape turned into an ApiError, and a job's server-sent event stream read
// with fetch() (EventSource cannot send headers), reconnecting with Last-Event-ID when it drops.

const KEY_STORAGE = "dopsd.apiKey";

/** A job in one of these statuses changes no more; a stream's last event has one of them as its type. */
export const TERMINAL_STATUSES = new Set(["succeeded", "failed", "canceled"]);

export function getKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function setKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY_STORAGE);
}

/** A failed request: the HTTP status (0: the service was not reached) and the API's error code, message, details. */
export class ApiError extends Error {
  constructor(status, code, message, details, retryAfter) {
    super(message || code);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.apiMessage = message;
    this.details = details;
    this.retryAfter = retryAfter;
  }
}

async function errorFromResponse(res) {
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  const e = body && typeof body === "object" && body.error ? body.error : {};
  return new ApiError(res.status, e.code || `http_${res.status}`, e.message || "", e.details ?? null,
    res.headers.get("Retry-After"));
}

function authHeaders(extra) {
  const headers = { ...(extra || {}) };
  const key = getKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

let onKeyRejected = () => {};
let signingOut = false;

/** Sets what happens when the API refuses the key (the entry module shows the key form again). */
export function whenKeyRejected(callback) {
  onKeyRejected = callback;
}

function keyRejected() {
  // A revoked or mistyped key: back to the key form, with a sentence saying why.
  if (signingOut) return;
  signingOut = true;
  clearKey();
  setTimeout(() => {
    signingOut = false;
    onKeyRejected("Your API key was not accepted (it may have been revoked). Enter a valid key.");
  });
}

/**
 * One request to the API with the key; resolves to the parsed JSON body (null when empty) and throws an ApiError
 * otherwise. A 401 signs the tab out unless `quiet401` (the key form tries a key that way).
 */
export async function api(path, { method = "GET", body, headers, signal, quiet401 = false } = {}) {
  let res;
  try {
    res = await fetch(path, { method, body, headers: authHeaders(headers), signal, cache: "no-store" });
  } catch (e) {
    if (signal?.aborted) throw e;
    throw new ApiError(0, "network", "", null, null);
  }
  if (!res.ok) {
    const err = await errorFromResponse(res);
    if (res.status === 401 && !quiet401) keyRejected();
    throw err;
  }
  if (res.status === 204) return null;
  const text = await res.text();
  return text ? JSON.parse(text) : null;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

// Server-sent events: `id:`, `event:`, `data:` lines; a blank line ends an event.
function parseEventBlock(block) {
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "id") id = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  return { id, data: data.join("\n") };
}

/**
 * Follows a job's event stream until the job is finished (reconnecting with Last-Event-ID if it drops): each event
 * goes to `onEvent`; `onEnd` is called once the job has finished (with the job when it had to be asked for), and
 * `onError` with an ApiError the stream cannot get past (the job is gone, the key is refused).
 */
export async function followEvents(jobId, { signal, onEvent, onEnd, onError }) {
  let last = 0;
  let failures = 0;
  while (!signal.aborted) {
    let res = null;
    try {
      const headers = authHeaders({ Accept: "text/event-stream" });
      if (last) headers["Last-Event-ID"] = String(last);
      res = await fetch(`/v1/jobs/${jobId}/events`, { headers, signal, cache: "no-store" });
    } catch {
      if (signal.aborted) return;
    }
    let sawEnd = false;
    if (res && !res.ok) {
      const err = await errorFromResponse(res);
      if (res.status === 401) keyRejected();
      if (res.status < 500 && res.status !== 429) {
        onError?.(err);
        return;
      }
    } else if (res) {
      failures = 0;
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer = (buffer + value).replace(/\r\n|\r(?!$)/g, "\n");
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const parsed = parseEventBlock(buffer.slice(0, cut));
            buffer = buffer.slice(cut + 2);
            if (!parsed) continue;
            let event;
            try {
              event = JSON.parse(parsed.data);
            } catch {
              continue;
            }
            if (parsed.id) last = Number(parsed.id) || last;
            if (TERMINAL_STATUSES.has(event.type)) sawEnd = true;
            onEvent(event);
          }
        }
      } catch {
        if (signal.aborted) return;
      }
    }
    if (signal.aborted) return;
    if (sawEnd) {
      onEnd?.();
      return;
    }
    // The stream closed without a final event: ask once whether the job is over, else reconnect.
    try {
      const job = await api(`/v1/jobs/${jobId}`, { signal });
      if (TERMINAL_STATUSES.has(job.status)) {
        onEnd?.(job);
        return;
      }
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof ApiError && e.status >= 400 && e.status < 500 && e.status !== 429) {
        onError?.(e);
        return;
      }
    }
    failures += 1;
    await sleep(Math.min(500 * 2 ** failures, 10000), signal);
  }
}
