// The web page of the fine-tuning service: a client of the public REST API, nothing more.
// The API key lives in sessionStorage and travels only in the Authorization header; live updates come from the
// job's server-sent event stream, read with fetch() (EventSource cannot send headers).

const KEY_STORAGE = "dopsd.apiKey";
const TERMINAL_STATUSES = new Set(["succeeded", "failed", "canceled"]);
const TERMINAL_EVENTS = new Set(["succeeded", "failed", "canceled"]);
const MAX_LIST_STREAMS = 4; // browsers allow 6 connections per host; leave room for ordinary requests
const IMAGE_TYPES = "image/png,image/jpeg,image/webp";
const PAGE_SIZE = 20;

const main = document.getElementById("main");
let viewAbort = null;

// ---------------------------------------------------------------------------------------------------------------
// Small helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  appendAll(el, children);
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  setAttrs(el, attrs);
  appendAll(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.setAttribute("class", v);
    else if (k === "text") el.textContent = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k in el && typeof v !== "string" && !(el instanceof SVGElement)) el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
}

function appendAll(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

function sentence(text) {
  let t = String(text ?? "").replaceAll("`", "").trim();
  if (!t) return "";
  t = t[0].toUpperCase() + t.slice(1);
  return /[.!?)]$/.test(t) ? t : `${t}.`;
}

function shortId(id) {
  return String(id).slice(0, 8);
}

function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "";
  if (seconds < 9.95) return `${Math.max(0, seconds).toFixed(1)} s`;
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function formatTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? "" : d.toLocaleString();
}

function formatLoss(x) {
  return typeof x === "number" && Number.isFinite(x) ? x.toPrecision(4) : "–";
}

function toast(message) {
  const el = document.getElementById("toast");
  el.textContent = message;
  el.classList.add("show");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => el.classList.remove("show"), 4000);
}

function statusLabel(status) {
  return { queued: "Queued", running: "Running", succeeded: "Finished", failed: "Failed", canceled: "Canceled" }[
    status
  ] ?? status;
}

function gpuSeconds(x) {
  const n = Math.max(1, Math.round(x));
  const text = `${n.toLocaleString("en")} GPU-second${n === 1 ? "" : "s"}`;
  return n >= 60 ? `${text} (${formatDuration(n)})` : text;
}

function badge(status) {
  return h("span", { class: `badge badge-${status}`, dataset: { status } }, statusLabel(status));
}

function kindLabel(job) {
  return job.kind === "preview" ? "Preview" : "Training job";
}

// ---------------------------------------------------------------------------------------------------------------
// The API key and the REST client

function getKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

function setKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

function clearKey() {
  sessionStorage.removeItem(KEY_STORAGE);
}

class ApiError extends Error {
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

let signingOut = false;

function keyRejected() {
  // A revoked or mistyped key: back to the key form, with a sentence saying why.
  if (signingOut) return;
  signingOut = true;
  clearKey();
  setTimeout(() => {
    signingOut = false;
    route("Your API key was not accepted (it may have been revoked). Enter a valid key.");
  });
}

async function api(path, { method = "GET", body, headers, signal, quiet401 = false } = {}) {
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

const FIELD_NAMES = {
  steps: "Steps", sample_every: "Sample every", sample_seeds: "Seeds", validation_prompts: "Prompts",
  trigger: "Trigger word", default_caption: "Default caption", captions: "Captions", preset: "Model",
  output_formats: "Download formats", learning_rate: "Learning rate",
};

function describeError(e) {
  if (!e || e.name === "AbortError") return "";
  if (!(e instanceof ApiError)) return "Something went wrong in this page. Reload it and try again.";
  if (e.status === 0) return "The service could not be reached. Check that it is running, then try again.";
  if (e.status === 401) return "The API key was not accepted. Enter a valid key.";
  const d = e.details;
  if (d && typeof d === "object" && !Array.isArray(d) && d.file && d.reason) {
    return sentence(`${d.file} was refused: ${d.reason}`);
  }
  if (Array.isArray(d) && d.length && d[0] && d[0].message) {
    const parts = d.slice(0, 3).map((x) => {
      const field = (x.loc || []).filter((p) => typeof p === "string" && p !== "body").pop();
      return field ? `${FIELD_NAMES[field] || field.replaceAll("_", " ")}: ${x.message}` : x.message;
    });
    const lead = sentence(e.apiMessage || "Some settings are not valid").replace(/\.$/, "");
    return sentence(`${lead} (${parts.join("; ")})`);
  }
  let text = sentence(e.apiMessage);
  if (e.status === 429 && e.retryAfter) text = `${text || "Too many requests right now."} Try again in ${e.retryAfter} s.`;
  if (!text && e.status >= 500) return `The service had a problem (HTTP ${e.status}). Try again in a moment.`;
  return text || `The request failed (HTTP ${e.status}).`;
}

function errorBox(message) {
  return h("p", { class: "error", role: "alert" }, message);
}

// ---------------------------------------------------------------------------------------------------------------
// Server-sent events over fetch(): `id:`, `event:`, `data:` lines, a blank line ends an event.

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

/** Follows a job's event stream until the job is finished (reconnecting with Last-Event-ID if it drops). */
async function followEvents(jobId, { signal, onEvent, onEnd, onError }) {
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
            if (TERMINAL_EVENTS.has(event.type)) sawEnd = true;
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

// ---------------------------------------------------------------------------------------------------------------
// Routing: #/new, #/jobs, #/jobs/<id>

function route(message) {
  viewAbort?.abort();
  viewAbort = new AbortController();
  const signal = viewAbort.signal;
  renderKeybox();
  main.replaceChildren();
  window.scrollTo(0, 0);
  const hash = location.hash || "#/new";
  for (const a of document.querySelectorAll("[data-nav]")) {
    const active = hash.startsWith(`#/${a.dataset.nav}`);
    if (active) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (!getKey()) {
    viewKey(typeof message === "string" ? message : "");
    return;
  }
  let m;
  if (hash === "#/new") viewNew(signal);
  else if (hash === "#/jobs") viewJobs(signal);
  else if ((m = hash.match(/^#\/jobs\/([0-9a-fA-F-]{36})$/))) viewJob(signal, m[1].toLowerCase());
  else location.replace("#/new");
}

function focusHeading() {
  const h1 = main.querySelector("h1");
  if (h1) {
    h1.tabIndex = -1;
    h1.focus({ preventScroll: true });
  }
}

function renderKeybox() {
  const box = document.getElementById("keybox");
  const key = getKey();
  if (!key) {
    box.replaceChildren();
    return;
  }
  box.replaceChildren(
    h("span", { class: "muted" }, `Key …${key.slice(-4)}`),
    h("button", {
      type: "button", class: "link", onclick: () => {
        clearKey();
        route("You are signed out of this tab. Enter a key to continue.");
      },
    }, "Sign out"),
  );
}

function viewKey(message) {
  const input = h("input", {
    id: "api-key", name: "api-key", type: "password", autocomplete: "off", spellcheck: "false", required: true,
  });
  const error = h("p", { class: "error", role: "alert" }, message || "");
  const button = h("button", { type: "submit", class: "primary" }, "Use this key");
  const form = h("form", { class: "card narrow", "aria-labelledby": "key-title" },
    h("h1", { id: "key-title" }, "Enter your API key"),
    h("p", {}, "The key stays in this browser tab only (session storage) and is sent to this service as an ",
      h("code", {}, "Authorization"), " header, never in a link."),
    h("div", { class: "field" }, h("label", { for: "api-key" }, "API key"), input),
    error,
    h("div", { class: "actions" }, button),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    button.disabled = true;
    error.textContent = "";
    setKey(key);
    try {
      await api("/v1/presets", { quiet401: true });
    } catch (e) {
      clearKey();
      button.disabled = false;
      error.textContent = describeError(e);
      input.focus();
      return;
    }
    if (!location.hash || location.hash === "#/") location.hash = "#/new";
    route();
  });
  main.replaceChildren(form);
  input.focus();
}

// ---------------------------------------------------------------------------------------------------------------
// New job: images (checked one by one with dry runs), captions, preset, steps, prompts, estimate, preview, submit

let presetsCache = null;

async function loadPresets(signal) {
  if (!presetsCache) presetsCache = await api("/v1/presets", { signal });
  return presetsCache;
}

const draft = {
  files: [], // {uid, file, name, size, url, status: "checking"|"ok"|"refused"|"unchecked", reason, caption}
  preset: "",
  trigger: "sks",
  defaultCaption: "a photo of [V]",
  steps: "",
  sampleEvery: "",
  seeds: "0",
  prompts: "a photo of [V]",
  formats: { diffusers: true, comfyui: true },
  preview: null, // {id, status, message, images}
  dryRunUnsupported: false,
};
let nextUid = 1;

function parseSeeds(text) {
  return String(text).split(/[\s,]+/).filter(Boolean).map(Number).filter((n) => Number.isInteger(n) && n >= 0);
}

function usableFiles() {
  return draft.files.filter((f) => f.status === "ok" || f.status === "unchecked");
}

function buildSpec() {
  const spec = { preset: draft.preset, trigger: draft.trigger.trim() || "sks" };
  spec.default_caption = draft.defaultCaption.trim() || "a photo of [V]";
  const captions = {};
  for (const f of usableFiles()) if (f.caption.trim()) captions[f.name] = [f.caption.trim()];
  if (Object.keys(captions).length) spec.captions = captions;
  if (String(draft.steps).trim()) spec.steps = Number(draft.steps);
  if (String(draft.sampleEvery).trim()) spec.sample_every = Number(draft.sampleEvery);
  const prompts = draft.prompts.split("\n").map((p) => p.trim()).filter(Boolean);
  if (prompts.length) spec.validation_prompts = prompts;
  const seeds = parseSeeds(draft.seeds);
  if (seeds.length) spec.sample_seeds = seeds;
  const formats = Object.entries(draft.formats).filter(([, on]) => on).map(([name]) => name);
  if (formats.length === 1) spec.output_formats = formats; // both is the default
  return spec;
}

function formData(files, spec) {
  const form = new FormData();
  for (const f of files) form.append("images", f.file, f.name);
  form.append("spec", JSON.stringify(spec));
  return form;
}

async function dryRun(files, spec, signal) {
  const result = await api("/v1/jobs?dry_run=true", { method: "POST", body: formData(files, spec), signal });
  if (!result || result.dry_run !== true) {
    // A server without dry runs created a real job: remove it, and check files only at submission from now on.
    draft.dryRunUnsupported = true;
    if (result && result.id) await api(`/v1/jobs/${result.id}`, { method: "DELETE" }).catch(() => {});
    return null;
  }
  return result;
}

function viewNew(signal) {
  const page = h("div", { class: "page" });
  main.replaceChildren(page);
  page.append(h("h1", {}, "Start a training job"),
    h("p", { class: "lead" }, "Add a few pictures of one concept (an object, a pet, a style), say what it is called, ",
      "and train a small adapter that teaches the model your concept."));

  const form = h("form", { class: "new-job", novalidate: true, "aria-label": "New training job" });
  page.append(form);

  // Images
  const fileInput = h("input", {
    id: "images", type: "file", multiple: true, accept: IMAGE_TYPES, class: "visually-hidden", tabindex: "-1",
    "aria-label": "Reference images",
  });
  const chooseButton = h("button", { type: "button", class: "secondary", id: "choose-images" }, "Choose images…");
  chooseButton.addEventListener("click", () => fileInput.click());
  const dropzone = h("div", { class: "dropzone", id: "dropzone" },
    h("span", { class: "dropzone-title" }, "Drop reference images here"),
    chooseButton,
    h("span", { class: "muted small" }, "PNG, JPEG or WebP · 1 to 64 images of one concept"),
  );
  dropzone.addEventListener("click", (ev) => {
    if (ev.target === dropzone) fileInput.click(); // a click anywhere on the zone, as on its button
  });
  const fileList = h("ul", { class: "files", id: "file-list", "aria-label": "Reference images" });
  const fileNote = h("p", { class: "muted small", id: "file-note", "aria-live": "polite" });
  const imagesSection = h("fieldset", { class: "card images" },
    h("legend", {}, "1. Reference images"), fileInput, dropzone, fileNote, fileList);

  // Concept
  const trigger = h("input", { id: "trigger", value: draft.trigger, maxlength: 50, required: true, autocomplete: "off" });
  const defaultCaption = h("input", { id: "default-caption", value: draft.defaultCaption, maxlength: 1000 });
  const conceptSection = h("fieldset", { class: "card" }, h("legend", {}, "2. Concept"),
    h("div", { class: "field" }, h("label", { for: "trigger" }, "Trigger word"), trigger,
      h("p", { class: "hint", id: "trigger-hint" }, "A rare word that will mean your concept, such as “sks”.")),
    h("div", { class: "field" }, h("label", { for: "default-caption" }, "Default caption"), defaultCaption,
      h("p", { class: "hint" }, h("code", {}, "[V]"), " is replaced by the trigger word. ",
        "Each image can have its own caption instead (next to its thumbnail).")),
  );
  trigger.setAttribute("aria-describedby", "trigger-hint");

  // Training
  const presetSelect = h("select", { id: "preset" });
  const presetHint = h("p", { class: "hint", id: "preset-hint" });
  presetSelect.setAttribute("aria-describedby", "preset-hint");
  const steps = h("input", { id: "steps", type: "number", min: 1, max: 10000, inputmode: "numeric", value: draft.steps });
  const sampleEvery = h("input", {
    id: "sample-every", type: "number", min: 0, max: 10000, inputmode: "numeric", value: draft.sampleEvery,
  });
  const seeds = h("input", {
    id: "seeds", value: draft.seeds, inputmode: "numeric", autocomplete: "off", "aria-describedby": "sample-hint",
  });
  sampleEvery.setAttribute("aria-describedby", "sample-hint");
  const prompts = h("textarea", { id: "prompts", rows: 3 });
  prompts.value = draft.prompts;
  const formatBoxes = ["diffusers", "comfyui"].map((name) => {
    const box = h("input", { type: "checkbox", id: `format-${name}`, checked: draft.formats[name] });
    box.addEventListener("change", () => {
      draft.formats[name] = box.checked;
      if (!draft.formats.diffusers && !draft.formats.comfyui) {
        draft.formats[name] = true;
        box.checked = true;
      }
      scheduleEstimate();
    });
    return h("label", { class: "check" }, box, name === "diffusers" ? " diffusers" : " ComfyUI");
  });
  const trainingSection = h("fieldset", { class: "card" }, h("legend", {}, "3. Training"),
    h("div", { class: "field" }, h("label", { for: "preset" }, "Model"), presetSelect, presetHint),
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "steps" }, "Steps"), steps),
      h("div", { class: "field" }, h("label", { for: "sample-every" }, "Sample every"), sampleEvery),
      h("div", { class: "field" }, h("label", { for: "seeds" }, "Sample seeds"), seeds),
    ),
    h("p", { class: "hint", id: "sample-hint" }, "Sample every: the number of steps between sample images (0: only at ",
      "the end). Seeds: one or more numbers, separated by commas."),
    h("div", { class: "field" }, h("label", { for: "prompts" }, "Validation prompts (one per line)"), prompts,
      h("p", { class: "hint" }, "Samples of these prompts show how the concept is learned; use ", h("code", {}, "[V]"), ".")),
    h("fieldset", { class: "inline" }, h("legend", {}, "Adapter formats"), formatBoxes),
  );

  // Estimate, preview, submit
  const estimate = h("div", { class: "estimate", id: "estimate", role: "status", "aria-live": "polite" },
    h("span", { class: "muted" }, "Add images to see an estimate."));
  const previewButton = h("button", { type: "button", id: "preview-button", class: "secondary" }, "Preview the concept first");
  const submitButton = h("button", { type: "submit", id: "submit-button", class: "primary" }, "Start training");
  const submitError = h("div", { id: "submit-error" });
  const previewBox = h("section", { class: "preview", id: "preview", "aria-live": "polite", "aria-label": "Zero-shot preview" });
  const summarySection = h("section", { class: "card summary", "aria-label": "Estimate and start" },
    h("h2", {}, "4. Check and start"), estimate,
    h("div", { class: "actions" }, previewButton, submitButton), submitError, previewBox);

  form.append(imagesSection, h("div", { class: "settings" }, conceptSection, trainingSection, summarySection));

  // --- images
  function setNote() {
    const refused = draft.files.filter((f) => f.status === "refused").length;
    const checking = draft.files.filter((f) => f.status === "checking").length;
    const parts = [];
    if (checking) parts.push(`Checking ${checking} ${checking === 1 ? "image" : "images"}…`);
    else if (draft.files.length) parts.push(`${usableFiles().length} of ${draft.files.length} images will be used.`);
    if (refused) parts.push(`${refused} refused ${refused === 1 ? "file is" : "files are"} left out.`);
    if (draft.dryRunUnsupported) parts.push("This service checks images when the job is submitted.");
    fileNote.textContent = parts.join(" ");
  }

  function renderFile(f) {
    const status = {
      checking: h("span", { class: "file-status checking" }, "Checking…"),
      ok: h("span", { class: "file-status ok" }, "Accepted"),
      unchecked: h("span", { class: "file-status" }, f.reason ? f.reason : "Not checked yet"),
      refused: h("span", { class: "file-status refused", role: "alert" }, `Refused: ${f.reason}`),
    }[f.status];
    const thumb = h("img", { class: "thumb", src: f.url, alt: "", width: 72, height: 72 });
    thumb.addEventListener("error", () => thumb.replaceWith(h("span", { class: "thumb thumb-broken", "aria-hidden": "true" }, "?")));
    const captionId = `caption-${f.uid}`;
    const caption = h("input", {
      id: captionId, value: f.caption, placeholder: draft.defaultCaption, maxlength: 1000, disabled: f.status === "refused",
    });
    caption.addEventListener("input", () => {
      f.caption = caption.value;
      scheduleEstimate();
    });
    const remove = h("button", { type: "button", class: "link", "aria-label": `Remove ${f.name}` }, "Remove");
    remove.addEventListener("click", () => {
      URL.revokeObjectURL(f.url);
      draft.files = draft.files.filter((x) => x !== f);
      li.remove();
      setNote();
      scheduleEstimate();
    });
    const li = h("li", { class: `file file-${f.status}`, dataset: { name: f.name, status: f.status } },
      thumb,
      h("div", { class: "file-body" },
        h("div", { class: "file-head" }, h("span", { class: "file-name" }, f.name),
          h("span", { class: "muted small" }, formatBytes(f.size)), status),
        h("label", { for: captionId, class: "small" }, `Caption for ${f.name} (optional)`), caption),
      remove);
    f.li?.replaceWith(li);
    f.li = li;
    return li;
  }

  /** Marks the file an API error names (an image error's `details.file`) as refused, with the API's reason. */
function markRefusedFile(e) {
  if (!(e instanceof ApiError && e.details && e.details.file)) return;
  const f = draft.files.find((x) => x.name === e.details.file);
  if (!f) return;
  f.status = "refused";
  f.reason = sentence(e.details.reason);
  updateFile(f);
}

function updateFile(f) {
    if (f.li && f.li.isConnected) renderFile(f);
    setNote();
  }

  let checkQueue = Promise.resolve();
  function check(f) {
    f.status = draft.dryRunUnsupported ? "unchecked" : "checking";
    updateFile(f);
    if (draft.dryRunUnsupported || !draft.preset) return; // checked once the models are loaded
    checkQueue = checkQueue.then(async () => {
      if (!draft.files.includes(f)) return;
      try {
        const result = await dryRun([f], { preset: draft.preset });
        f.status = result ? "ok" : "unchecked";
        f.reason = "";
      } catch (e) {
        if (e instanceof ApiError && e.details && e.details.file) {
          f.status = "refused";
          f.reason = sentence(e.details.reason || e.apiMessage);
        } else if (e instanceof ApiError && e.status === 413) {
          f.status = "refused";
          f.reason = describeError(e);
        } else {
          f.status = "unchecked";
          f.reason = `Not checked: ${describeError(e)}`;
        }
      }
      updateFile(f);
      scheduleEstimate();
    });
  }

  function addFiles(list) {
    for (const file of list) {
      const name = file.name || "image";
      if (draft.files.some((f) => f.name === name)) {
        toast(`${name} is already in the list.`);
        continue;
      }
      const f = { uid: nextUid++, file, name, size: file.size, url: URL.createObjectURL(file), status: "checking", reason: "", caption: "" };
      draft.files.push(f);
      fileList.append(renderFile(f));
      check(f);
    }
    setNote();
    scheduleEstimate();
  }

  fileInput.addEventListener("change", () => {
    addFiles([...fileInput.files]);
    fileInput.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    dropzone.addEventListener(type, (ev) => {
      ev.preventDefault();
      dropzone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "dragend"]) dropzone.addEventListener(type, () => dropzone.classList.remove("dragging"));
  dropzone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    dropzone.classList.remove("dragging");
    addFiles([...(ev.dataTransfer?.files || [])]);
  });
  // A file dropped next to the zone should not open in the tab and lose the form.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (ev) => ev.preventDefault(), { signal });

  for (const f of draft.files) fileList.append(renderFile(f));
  setNote();

  // --- fields
  const bind = (el, key, recheck) => el.addEventListener("input", () => {
    draft[key] = el.value;
    if (recheck) recheck();
    scheduleEstimate();
  });
  bind(trigger, "trigger");
  bind(defaultCaption, "defaultCaption", () => {
    for (const f of draft.files) if (f.li) f.li.querySelector("input").placeholder = draft.defaultCaption;
  });
  bind(steps, "steps");
  bind(sampleEvery, "sampleEvery");
  bind(seeds, "seeds");
  bind(prompts, "prompts");

  function showPresetHint() {
    const p = (presetsCache || []).find((x) => x.name === draft.preset);
    if (!p) return;
    presetHint.textContent = `${p.description}. Images need a short side of at least ${p.min_image_side} px.`;
    steps.placeholder = p.defaults?.max_train_steps ? `${p.defaults.max_train_steps} (default)` : "";
    sampleEvery.placeholder = p.defaults?.sample_every !== undefined ? `${p.defaults.sample_every} (default)` : "";
  }

  presetSelect.addEventListener("change", () => {
    draft.preset = presetSelect.value;
    showPresetHint();
    for (const f of draft.files) check(f);
    scheduleEstimate();
  });

  loadPresets(signal).then((presets) => {
    presetSelect.replaceChildren(...presets.map((p) => h("option", { value: p.name }, `${p.name} (${p.device})`)));
    if (!draft.preset || !presets.some((p) => p.name === draft.preset)) {
      draft.preset = (presets.find((p) => p.name.startsWith("tiny")) || presets[0]).name;
    }
    presetSelect.value = draft.preset;
    showPresetHint();
    for (const f of draft.files) if (f.status === "checking") check(f);
    scheduleEstimate();
  }).catch((e) => {
    if (!signal.aborted) presetHint.replaceWith(errorBox(`The models could not be loaded. ${describeError(e)}`));
  });

  // --- estimate (a dry run of the whole submission)
  let estimateTimer = null;
  let estimateAbort = null;
  function scheduleEstimate() {
    clearTimeout(estimateTimer);
    estimateTimer = setTimeout(runEstimate, 400);
  }
  async function runEstimate() {
    estimateAbort?.abort();
    if (signal.aborted || !draft.preset) return;
    const files = usableFiles();
    if (!files.length || draft.files.some((f) => f.status === "checking")) {
      estimate.replaceChildren(h("span", { class: "muted" },
        files.length ? "Checking images…" : "Add images to see an estimate."));
      return;
    }
    if (draft.dryRunUnsupported) {
      estimate.replaceChildren(h("span", { class: "muted" }, "This service gives no estimate before submission."));
      return;
    }
    estimateAbort = new AbortController();
    const local = estimateAbort;
    signal.addEventListener("abort", () => local.abort(), { once: true });
    estimate.classList.add("busy");
    try {
      const r = await dryRun(files, buildSpec(), local.signal);
      if (!r) return;
      const total = r.config?.max_train_steps;
      estimate.replaceChildren(
        h("dl", { class: "facts" },
          h("div", {}, h("dt", {}, "Estimated GPU time"),
            h("dd", { id: "estimate-gpu" }, gpuSeconds(r.estimated_gpu_seconds))),
          h("div", {}, h("dt", {}, "Queue position"),
            h("dd", { id: "estimate-queue" }, r.queue_position <= 1 ? `${r.queue_position} (next to run)` : `${r.queue_position}`)),
          h("div", {}, h("dt", {}, "Images"), h("dd", {}, `${r.images?.length ?? files.length}`)),
          total ? h("div", {}, h("dt", {}, "Steps"), h("dd", {}, `${total}`)) : null,
        ));
    } catch (e) {
      if (local.signal.aborted) return;
      markRefusedFile(e);
      estimate.replaceChildren(errorBox(describeError(e)));
    } finally {
      estimate.classList.remove("busy");
    }
  }

  // --- preview (zero-shot: the base model shown your images, before any training)
  function renderPreview() {
    const p = draft.preview;
    if (!p) {
      previewBox.replaceChildren();
      return;
    }
    const children = [h("h3", {}, "Zero-shot preview ", badge(p.status)), h("p", { class: "muted" }, p.message || "")];
    if (p.error) children.push(errorBox(p.error));
    if (p.images?.length) {
      children.push(h("div", { class: "grid" }, p.images.map((im) => h("figure", { class: "sample" },
        h("img", { src: im.url, alt: `Preview of “${im.prompt}”, seed ${im.seed}`, loading: "lazy" }),
        h("figcaption", {}, `${im.prompt} · seed ${im.seed}${im.source ? ` · ${sourceLabel(im.source)}` : ""}`)))));
    }
    children.push(h("p", {}, h("a", { href: `#/jobs/${p.id}` }, "Open the preview's page")));
    previewBox.replaceChildren(...children);
  }

  async function watchPreview() {
    const p = draft.preview;
    if (!p || TERMINAL_STATUSES.has(p.status)) return;
    await followEvents(p.id, {
      signal,
      onEvent: (ev) => {
        const d = ev.data || {};
        if (ev.type === "queued") p.message = `Waiting in the queue (position ${d.position ?? "?"}).`;
        else if (ev.type === "started") {
          p.status = "running";
          p.message = "Loading the model…";
        } else if (ev.type === "model_loaded") p.message = "Generating the preview…";
        else if (ev.type === "sample" && Array.isArray(d.images)) {
          p.images = d.images.map((im) => ({ prompt: im.prompt, seed: im.seed, source: im.source || im.kind, url: im.url }));
        } else if (ev.type === "failed") {
          p.status = "failed";
          p.error = sentence(d.message || "The preview failed");
        } else if (ev.type === "canceled") p.status = "canceled";
        else if (ev.type === "succeeded") p.status = "succeeded";
        renderPreview();
      },
      onError: (e) => {
        p.error = describeError(e);
        renderPreview();
      },
    });
    if (signal.aborted || p.status !== "succeeded") return;
    try {
      const full = await api(`/v1/previews/${p.id}`, { signal });
      p.status = full.status;
      p.message = "";
      // The preview's images (`preview_images`; `images` when they carry URLs rather than the uploads' names).
      const shown = full.preview_images || (full.images || []).filter((im) => im.url);
      if (shown.length) p.images = shown;
    } catch (e) {
      if (!signal.aborted) p.error = describeError(e);
    }
    renderPreview();
  }

  previewButton.addEventListener("click", async () => {
    submitError.replaceChildren();
    const files = usableFiles();
    if (!files.length) {
      submitError.replaceChildren(errorBox("Add at least one image that was not refused."));
      return;
    }
    previewButton.disabled = true;
    try {
      const job = await api("/v1/previews", { method: "POST", body: formData(files, buildSpec()), signal });
      draft.preview = { id: job.id, status: job.status, message: "Submitted.", images: [] };
      renderPreview();
      watchPreview();
    } catch (e) {
      if (!signal.aborted) submitError.replaceChildren(errorBox(describeError(e)));
    } finally {
      previewButton.disabled = false;
    }
  });
  renderPreview();
  watchPreview();

  // --- submit
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    submitError.replaceChildren();
    const files = usableFiles();
    if (!files.length) {
      submitError.replaceChildren(errorBox("Add at least one image that was not refused."));
      return;
    }
    if (draft.files.some((f) => f.status === "checking")) {
      submitError.replaceChildren(errorBox("Some images are still being checked; try again in a moment."));
      return;
    }
    submitButton.disabled = true;
    submitButton.textContent = "Starting…";
    try {
      const job = await api("/v1/jobs", {
        method: "POST", body: formData(files, buildSpec()), signal,
        headers: { "Idempotency-Key": draft.idempotencyKey || (draft.idempotencyKey = crypto.randomUUID()) },
      });
      for (const f of draft.files) URL.revokeObjectURL(f.url);
      draft.files = [];
      draft.preview = null;
      draft.idempotencyKey = null;
      toast("The job was submitted.");
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof ApiError && e.status === 409) draft.idempotencyKey = null;
      submitError.replaceChildren(errorBox(describeError(e)));
      markRefusedFile(e);
    } finally {
      submitButton.disabled = false;
      submitButton.textContent = "Start training";
    }
  });
  // Any change to the request makes it a new one (a new idempotency key at the next submission).
  form.addEventListener("input", () => { draft.idempotencyKey = null; });
  form.addEventListener("change", () => { draft.idempotencyKey = null; });

  focusHeading();
}

const KIND_LABELS = {
  base: "Base model", adapter: "With adapter", teacher: "Teacher (sees the image)", preview: "Zero-shot preview",
};
const KIND_ORDER = ["base", "adapter", "teacher", "preview"];

function sourceLabel(source) {
  return KIND_LABELS[source] ? KIND_LABELS[source].toLowerCase() : `from ${source}`;
}

// ---------------------------------------------------------------------------------------------------------------
// Job list with live progress

function progressLine(job) {
  if (job.status === "queued") {
    return h("span", { class: "muted" }, job.queue_position ? `Position ${job.queue_position} in the queue` : "Queued");
  }
  const p = job.progress;
  if (!p || !p.total_steps) return h("span", { class: "muted" }, job.status === "running" ? "Starting…" : "");
  const pct = Math.round((100 * p.step) / p.total_steps);
  return h("span", { class: "progress-inline" },
    h("progress", { max: p.total_steps, value: p.step, "aria-label": `Step ${p.step} of ${p.total_steps}` }),
    h("span", { class: "small" }, `${p.step}/${p.total_steps} (${pct}%)`,
      job.status === "running" && p.eta_s ? ` · ${formatDuration(p.eta_s)} left` : ""));
}

function viewJobs(signal) {
  const filter = h("select", { id: "status-filter" },
    ["", "queued", "running", "succeeded", "failed", "canceled"].map((s) =>
      h("option", { value: s }, s ? statusLabel(s) : "All")));
  const list = h("ul", { class: "job-list", id: "job-list", "aria-live": "polite" });
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "Show more");
  const message = h("div");
  main.replaceChildren(h("div", { class: "page" },
    h("div", { class: "page-head" }, h("h1", {}, "Jobs"),
      h("div", { class: "inline-field" }, h("label", { for: "status-filter" }, "Show"), filter),
      h("a", { href: "#/new", class: "button primary" }, "New job")),
    message, list, h("div", { class: "actions" }, more)));
  focusHeading();

  let pageAbort = null;
  let cursor = null;
  let live = { streams: 0 }; // streams open for this listing
  const rows = new Map();

  function renderRow(job) {
    const row = h("li", { class: "job-row", dataset: { id: job.id, status: job.status } },
      h("div", { class: "job-row-main" },
        h("a", { href: `#/jobs/${job.id}`, class: "job-link" }, `${kindLabel(job)} ${shortId(job.id)}`),
        badge(job.status)),
      h("div", { class: "job-row-meta muted small" },
        `${job.preset} · ${job.images.length} ${job.images.length === 1 ? "image" : "images"} · ${formatTime(job.created_at)}`),
      h("div", { class: "job-row-progress" }, progressLine(job)));
    const old = rows.get(job.id)?.row;
    if (old) old.replaceWith(row);
    rows.set(job.id, { job, row });
    return row;
  }

  function watch(job, s) {
    const counter = live;
    if (counter.streams >= MAX_LIST_STREAMS || TERMINAL_STATUSES.has(job.status)) return;
    counter.streams += 1;
    followEvents(job.id, {
      signal: s,
      onEvent: (ev) => {
        const entry = rows.get(job.id);
        if (!entry) return;
        const j = entry.job;
        const d = ev.data || {};
        if (ev.type === "started") j.status = "running";
        else if (ev.type === "queued" && d.position) j.queue_position = d.position;
        else if (ev.type === "progress") {
          j.status = "running";
          j.progress = { step: d.step, total_steps: d.total_steps, loss: d.loss, eta_s: d.eta_s };
        } else if (TERMINAL_EVENTS.has(ev.type)) j.status = ev.type;
        renderRow(j);
      },
      onEnd: async () => {
        try {
          renderRow(await api(`/v1/jobs/${job.id}`, { signal: s }));
        } catch {
          // the row keeps what the stream said
        }
      },
    }).finally(() => { counter.streams -= 1; });
  }

  async function load(reset) {
    if (reset) {
      pageAbort?.abort();
      pageAbort = new AbortController();
      signal.addEventListener("abort", () => pageAbort.abort(), { once: true });
      cursor = null;
      live = { streams: 0 };
      rows.clear();
      list.replaceChildren();
    }
    const s = pageAbort.signal;
    message.replaceChildren();
    const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (filter.value) params.set("status", filter.value);
    if (cursor) params.set("cursor", cursor);
    try {
      const page = await api(`/v1/jobs?${params}`, { signal: s });
      for (const job of page.data) list.append(renderRow(job));
      for (const job of page.data) watch(job, s);
      cursor = page.next_cursor;
      more.hidden = !cursor || page.data.length < PAGE_SIZE;
      if (!rows.size) {
        message.replaceChildren(h("p", { class: "card empty" },
          filter.value ? "No jobs with this status." : "No jobs yet. ", filter.value ? null : h("a", { href: "#/new" }, "Start one.")));
      }
    } catch (e) {
      if (!s.aborted) message.replaceChildren(errorBox(describeError(e)));
    }
  }

  filter.addEventListener("change", () => load(true));
  more.addEventListener("click", () => load(false));
  load(true);
}

// ---------------------------------------------------------------------------------------------------------------
// One job: progress, ETA, loss chart, samples, event log, downloads, cancel and delete

function describeEvent(ev) {
  const d = ev.data || {};
  switch (ev.type) {
    case "queued":
      return `Queued with ${Array.isArray(d.images) ? d.images.length : d.images ?? "?"} images${d.position ? ` at position ${d.position}` : ""}.`;
    case "started":
      return `Started on ${d.worker ?? "a worker"}${d.attempt > 1 ? ` (attempt ${d.attempt})` : ""}.`;
    case "model_loaded":
      return `Model loaded in ${formatDuration(d.load_s) || "?"}${d.cached ? " (already in memory)" : ""}.`;
    case "training":
      return `Training began: ${d.total_steps} steps${d.start_step ? `, resuming at step ${d.start_step}` : ""}.`;
    case "progress":
      return `Step ${d.step} of ${d.total_steps}, loss ${formatLoss(d.loss)}.`;
    case "checkpoint":
      return `Checkpoint saved at step ${d.step}.`;
    case "sample":
      return `${d.final ? "Final samples" : "Samples"} at step ${d.step} (${Array.isArray(d.images) ? d.images.length : d.images ?? 0} images).`;
    case "succeeded":
      return `Finished${d.gpu_seconds ? ` after ${formatDuration(d.gpu_seconds)} of GPU time` : ""}${typeof d.final_loss === "number" ? `, final loss ${formatLoss(d.final_loss)}` : ""}.`;
    case "failed":
      return `Failed: ${sentence(d.message || d.code || "unknown error")}`;
    case "canceled":
      return d.while === "queued" ? "Canceled while queued." : `Canceled${d.step !== undefined ? ` at step ${d.step}` : ""}.`;
    case "cancel_requested":
      return "Cancel requested; the job stops within one step.";
    case "requeued":
      return `Put back in the queue after attempt ${d.after_attempt ?? "?"}.`;
    case "purged":
      return "Its data was deleted (retention period).";
    default:
      return sentence(ev.type.replaceAll("_", " "));
  }
}

function lossChart(points) {
  const W = 640;
  const H = 220;
  const pad = { l: 74, r: 12, t: 12, b: 32 };
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", id: "loss-chart" });
  const latest = points[points.length - 1];
  chart.setAttribute("aria-label", points.length
    ? `Training loss over ${points.length} reports; latest ${formatLoss(latest.loss)} at step ${latest.step}.`
    : "Training loss: no reports yet.");
  if (!points.length) {
    chart.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "chart-empty" }, "No loss reported yet"));
    return chart;
  }
  const maxStep = Math.max(latest.step, 1); // the steps so far: the curve fills the chart from the first report
  let lo = Math.min(...points.map((p) => p.loss));
  let hi = Math.max(...points.map((p) => p.loss));
  if (hi - lo < 1e-12) {
    hi += Math.abs(hi) * 0.05 || 1e-3;
    lo -= Math.abs(lo) * 0.05 || 1e-3;
  }
  const x = (step) => pad.l + ((W - pad.l - pad.r) * step) / maxStep;
  const y = (loss) => pad.t + ((H - pad.t - pad.b) * (hi - loss)) / (hi - lo);
  const grid = [hi, (hi + lo) / 2, lo].map((v) => svg("g", {},
    svg("line", { x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v), class: "chart-grid" }),
    svg("text", { x: pad.l - 6, y: y(v) + 4, "text-anchor": "end", class: "chart-label" }, formatLoss(v))));
  const xLabels = [0, maxStep].map((s) => svg("text", {
    x: x(s), y: H - 10, "text-anchor": s ? "end" : "start", class: "chart-label",
  }, s ? `step ${s}` : "0"));
  chart.append(...grid, ...xLabels,
    svg("polyline", { class: "chart-line", points: points.map((p) => `${x(p.step).toFixed(1)},${y(p.loss).toFixed(1)}`).join(" ") }),
    svg("circle", { class: "chart-dot", cx: x(latest.step), cy: y(latest.loss), r: 4 }));
  return chart;
}

function kindRank(kind) {
  const i = KIND_ORDER.indexOf(kind);
  return i < 0 ? KIND_ORDER.length : i;
}

function diffusersSnippet(job, preset, adapterName) {
  const c = job.config || {};
  const base = c.pretrained_model_name_or_path || "<base model>";
  const trigger = c.trigger || "sks";
  const prompt = (c.validation_prompts?.[0] || "a photo of [V]").replaceAll("[V]", trigger).replaceAll('"', '\\"');
  const lines = ["import torch", "from diffusers import DiffusionPipeline", ""];
  if (base.startsWith("tiny://")) lines.push("# a tiny test preset: use the real base model of the family here");
  lines.push(
    `pipe = DiffusionPipeline.from_pretrained("${base}", torch_dtype=torch.bfloat16).to("cuda")`,
    `pipe.load_lora_weights("${adapterName}")  # the adapter downloaded above`,
    `image = pipe("${prompt}", num_inference_steps=${c.sample_steps || 8}${preset?.family === "z_image" ? ", guidance_scale=0.0" : ""}).images[0]`,
    `image.save("${trigger}.png")`,
  );
  return lines.join("\n");
}

function findAdapter(artifacts, format) {
  const adapters = artifacts.filter((a) => a.kind.startsWith("adapter") || (a.name.endsWith(".safetensors") && !a.name.includes("/")));
  const comfy = (a) => /comfy/i.test(a.kind) || /comfy/i.test(a.name);
  return format === "comfyui" ? adapters.find(comfy) : adapters.find((a) => !comfy(a));
}

function download(url, name) {
  const a = h("a", { href: url, download: name, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
}

async function viewJob(signal, id) {
  const page = h("div", { class: "page job-page" });
  main.replaceChildren(page, h("p", { class: "muted" }, "Loading…"));
  let job;
  try {
    job = await api(`/v1/jobs/${id}`, { signal });
  } catch (e) {
    if (signal.aborted) return;
    const text = e instanceof ApiError && e.status === 404 ? "This job does not exist, or it was deleted." : describeError(e);
    main.replaceChildren(h("div", { class: "page" }, h("h1", {}, "Job not found"), errorBox(text),
      h("p", {}, h("a", { href: "#/jobs" }, "Back to the jobs"))));
    focusHeading();
    return;
  }
  main.replaceChildren(page);

  const state = {
    points: [], samples: new Map(), contactSheets: new Map(), log: [], elapsed: null, metrics: null,
    artifacts: null, sawSampleImages: false,
  };

  const title = h("h1", {}, `${kindLabel(job)} ${shortId(job.id)} `);
  const badgeSlot = h("span", { id: "job-status" });
  const meta = h("p", { class: "muted" });
  const progressBar = h("progress", { id: "job-progress", max: 1, value: 0, "aria-label": "Training progress" });
  const progressText = h("p", { id: "progress-text", class: "progress-text", "aria-live": "polite" });
  const errorSlot = h("div", { id: "job-error" });
  const actions = h("div", { class: "actions", id: "job-actions" });
  const results = h("section", { class: "card results", id: "results", hidden: true, "aria-labelledby": "results-title" });
  const chartSlot = h("div", { class: "chart-wrap" });
  const gallery = h("div", { class: "gallery", id: "gallery" });
  const logList = h("ol", { class: "log", id: "event-log" });

  page.append(
    h("div", { class: "page-head" }, title, badgeSlot),
    meta,
    h("section", { class: "card status-card", "aria-label": "Progress" }, progressBar, progressText, errorSlot, actions),
    results,
    h("div", { class: "two" },
      h("section", { class: "card", "aria-labelledby": "chart-title" }, h("h2", { id: "chart-title" }, "Loss"), chartSlot),
      h("section", { class: "card", "aria-labelledby": "log-title" }, h("h2", { id: "log-title" }, "Event log"),
        h("div", { class: "log-wrap" }, logList))),
    h("section", { class: "card", "aria-labelledby": "gallery-title" },
      h("h2", { id: "gallery-title" }, job.kind === "preview" ? "Preview images" : "Samples"),
      h("p", { class: "muted small" }, job.kind === "preview"
        ? "What the model makes of your concept before any training."
        : "For each prompt and step: the base model beside the model with the adapter."),
      gallery),
  );
  focusHeading();

  // --- rendering
  function renderHeader() {
    badgeSlot.replaceChildren(badge(job.status));
    const bits = [job.preset, `${job.images.length} ${job.images.length === 1 ? "image" : "images"}`, `created ${formatTime(job.created_at)}`];
    if (job.finished_at) bits.push(`finished ${formatTime(job.finished_at)}`);
    if (typeof job.gpu_seconds === "number" && job.gpu_seconds > 0) bits.push(`${formatDuration(job.gpu_seconds)} GPU time`);
    meta.textContent = bits.join(" · ");
  }

  function renderProgress() {
    const p = job.progress;
    const total = p?.total_steps || job.config?.max_train_steps || 0;
    const step = p?.step || 0;
    if (job.status === "succeeded" && total) {
      progressBar.max = total;
      progressBar.value = total;
    } else if (total) {
      progressBar.max = total;
      progressBar.value = step;
    } else {
      progressBar.removeAttribute("value");
    }
    progressBar.setAttribute("aria-valuetext", total ? `Step ${step} of ${total}` : "Not started");
    let text;
    if (job.status === "queued") {
      text = job.queue_position ? `Waiting in the queue: position ${job.queue_position}.` : "Waiting in the queue.";
    } else if (job.status === "running") {
      text = p && p.total_steps ? `Step ${p.step} of ${p.total_steps}` : "Starting…";
      if (p && p.total_steps) {
        if (p.eta_s !== null && p.eta_s !== undefined) text += ` · about ${formatDuration(p.eta_s)} left`;
        if (state.elapsed) text += ` · ${formatDuration(state.elapsed)} elapsed`;
        if (typeof p.loss === "number") text += ` · loss ${formatLoss(p.loss)}`;
      }
      if (job.cancel_requested) text += " · stopping…";
    } else if (job.status === "succeeded") {
      text = total ? `Finished: ${total} of ${total} steps.` : "Finished.";
    } else if (job.status === "failed") {
      text = step ? `Failed at step ${step}.` : "Failed.";
    } else {
      text = step ? `Canceled at step ${step}.` : "Canceled.";
    }
    progressText.textContent = text;
    progressText.dataset.step = String(step);
    progressText.dataset.total = String(total);
    errorSlot.replaceChildren(job.error ? errorBox(sentence(job.error.message || job.error.code)) : "");
  }

  function renderActions() {
    const children = [];
    if (!TERMINAL_STATUSES.has(job.status)) {
      const cancel = h("button", { type: "button", class: "secondary", id: "cancel-button", disabled: job.cancel_requested },
        job.cancel_requested ? "Stopping…" : "Cancel job");
      cancel.addEventListener("click", async () => {
        cancel.disabled = true;
        try {
          job = await api(`/v1/jobs/${job.id}/cancel`, { method: "POST", signal });
          toast(job.status === "canceled" ? "The job was canceled." : "Cancel requested; the job stops within one step.");
          renderAll();
        } catch (e) {
          if (!signal.aborted) {
            cancel.disabled = false;
            errorSlot.replaceChildren(errorBox(describeError(e)));
          }
        }
      });
      children.push(cancel);
    }
    const del = h("button", { type: "button", class: "danger", id: "delete-button" }, "Delete job and data");
    del.addEventListener("click", () => {
      const confirm = h("button", { type: "button", class: "danger", id: "confirm-delete" }, "Yes, delete everything");
      const keep = h("button", { type: "button", class: "secondary" }, "Keep it");
      const box = h("div", { class: "confirm", role: "group", "aria-label": "Confirm deletion" },
        h("p", {}, "Delete this job, its images, adapter and samples? This cannot be undone."), confirm, keep);
      keep.addEventListener("click", () => {
        box.remove();
        del.hidden = false;
        del.focus();
      });
      confirm.addEventListener("click", async () => {
        confirm.disabled = true;
        try {
          await api(`/v1/jobs/${job.id}`, { method: "DELETE", signal });
          toast("The job and its data were deleted.");
          location.hash = "#/jobs";
        } catch (e) {
          if (!signal.aborted) {
            confirm.disabled = false;
            box.append(errorBox(describeError(e)));
          }
        }
      });
      del.hidden = true;
      actions.append(box);
      keep.focus();
    });
    children.push(del);
    actions.replaceChildren(...children);
  }

  let chartQueued = false;
  function renderChart() {
    if (chartQueued) return;
    chartQueued = true;
    requestAnimationFrame(() => {
      chartQueued = false;
      chartSlot.replaceChildren(lossChart(state.points));
    });
  }

  function freshUrl(item) {
    if (!state.artifacts || !item.name) return item.url;
    const hit = state.artifacts.find((a) => a.name === item.name || a.name.endsWith(`/${item.name}`));
    return hit ? hit.url : item.url;
  }

  // One row per prompt and seed: base model beside adapter (or, for a preview, one image per reference image);
  // the teacher's images (the model shown each reference image) share one row.
  function addSample(group, im) {
    const kind = im.kind || "adapter";
    const teacher = kind === "teacher";
    const key = teacher ? "teacher" : `${im.prompt}\u0000${im.seed}`;
    const row = group.rows.get(key) || {
      title: teacher ? "What the teacher sees" : `“${im.prompt}”`,
      note: teacher ? " one image per reference image" : ` seed ${im.seed}`,
      figures: new Map(),
    };
    const perReference = teacher || kind === "preview";
    const label = perReference ? im.source || KIND_LABELS[kind] || kind : KIND_LABELS[kind] || kind;
    row.figures.set(perReference ? `${kind}:${im.source}` : kind, { kind, label, image: im });
    group.rows.set(key, row);
  }

  function renderGallery() {
    const steps = [...state.samples.keys()].sort((a, b) => b - a);
    if (!steps.length) {
      const fallback = (state.artifacts || []).filter((a) => a.kind === "sample" && a.content_type.startsWith("image/"));
      if (fallback.length && !state.sawSampleImages) {
        gallery.replaceChildren(h("div", { class: "grid" }, fallback.map((a) => h("figure", { class: "sample" },
          h("img", { src: a.url, alt: a.name, loading: "lazy" }), h("figcaption", {}, a.name)))));
      } else {
        gallery.replaceChildren(h("p", { class: "muted", id: "gallery-empty" }, TERMINAL_STATUSES.has(job.status)
          ? "No samples were made." : "Samples appear here as training makes them."));
      }
      return;
    }
    gallery.replaceChildren(...steps.map((step) => {
      const group = state.samples.get(step);
      const sheet = state.contactSheets.get(step);
      return h("section", { class: "sample-step", dataset: { step } },
        h("h3", {}, group.final ? `Step ${step} (final)` : `Step ${step}`,
          sheet ? h("a", { href: sheet, class: "small sheet-link", target: "_blank", rel: "noopener" }, "contact sheet") : null),
        [...group.rows.values()].map((row) => {
          const figures = [...row.figures.values()].sort((a, b) => kindRank(a.kind) - kindRank(b.kind));
          return h("div", { class: "sample-row" },
            h("p", { class: "sample-prompt" }, row.title, h("span", { class: "muted small" }, row.note)),
            h("div", { class: "sample-pair" }, figures.map((f) => h("figure", { class: `sample sample-${f.kind}`, dataset: { kind: f.kind } },
              h("img", { src: freshUrl(f.image), loading: "lazy", width: 256, height: 256, alt: `${f.label}: ${row.title}, step ${step}` }),
              h("figcaption", {}, f.label)))));
        }));
    }));
  }

  function renderLog() {
    // Progress reports are many: the log keeps every other event and the latest progress line.
    const items = [];
    let lastProgress = null;
    for (const ev of state.log) {
      if (ev.type === "progress") {
        lastProgress = ev;
        continue;
      }
      items.push(ev);
    }
    if (lastProgress) {
      const i = items.findIndex((ev) => ev.id > lastProgress.id);
      items.splice(i < 0 ? items.length : i, 0, lastProgress);
    }
    logList.replaceChildren(...items.map((ev) => h("li", { class: `log-${ev.type}`, dataset: { type: ev.type } },
      h("time", { datetime: ev.created_at, class: "muted small" }, new Date(ev.created_at).toLocaleTimeString()),
      " ", describeEvent(ev))));
  }

  async function renderResults() {
    if (job.status !== "succeeded" || job.kind === "preview") {
      results.hidden = true;
      return;
    }
    results.hidden = false;
    const formats = h("div", { class: "actions", id: "downloads" });
    const note = h("p", { class: "small", "aria-live": "polite" });
    const m = state.metrics || {};
    const facts = [];
    if (typeof m.gap_before === "number" && typeof m.gap_after === "number") {
      const change = m.gap_before ? Math.round((100 * (m.gap_after - m.gap_before)) / m.gap_before) : 0;
      facts.push(h("div", {}, h("dt", {}, "Teacher–student gap"),
        h("dd", {}, `${formatLoss(m.gap_before)} → ${formatLoss(m.gap_after)} (${change > 0 ? "+" : ""}${change}%)`)));
    }
    if (typeof m.final_loss === "number") facts.push(h("div", {}, h("dt", {}, "Final loss"), h("dd", {}, formatLoss(m.final_loss))));
    const gpu = m.gpu_seconds ?? job.gpu_seconds;
    if (typeof gpu === "number") facts.push(h("div", {}, h("dt", {}, "GPU time"), h("dd", {}, formatDuration(gpu))));
    const code = h("code", { id: "snippet" });
    const copy = h("button", { type: "button", class: "secondary", id: "copy-snippet" }, "Copy code");
    const copied = h("span", { class: "small muted", "aria-live": "polite" });
    results.replaceChildren(
      h("h2", { id: "results-title" }, "Your adapter"),
      facts.length ? h("dl", { class: "facts" }, facts) : null,
      formats, note,
      h("h3", {}, "Use it in diffusers"),
      h("pre", { class: "snippet" }, code),
      h("div", { class: "actions" }, copy, copied),
    );
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(code.textContent);
        copied.textContent = "Copied.";
      } catch {
        getSelection().selectAllChildren(code);
        copied.textContent = "Selected: press Ctrl+C (⌘C) to copy.";
      }
    });
    code.textContent = diffusersSnippet(job, null, "pytorch_lora_weights.safetensors");
    try {
      const [artifacts, presets] = await Promise.all([
        api(`/v1/jobs/${job.id}/artifacts`, { signal }),
        loadPresets(signal).catch(() => []),
      ]);
      state.artifacts = artifacts.data;
      const preset = presets.find((p) => p.name === job.preset);
      const diffusersFile = findAdapter(state.artifacts, "diffusers");
      code.textContent = diffusersSnippet(job, preset, diffusersFile ? diffusersFile.name.split("/").pop() : "pytorch_lora_weights.safetensors");
      const buttons = [];
      for (const [format, label] of [["diffusers", "Download for diffusers"], ["comfyui", "Download for ComfyUI"]]) {
        const artifact = findAdapter(state.artifacts, format);
        if (!artifact) continue;
        const b = h("button", { type: "button", class: format === "diffusers" ? "primary" : "secondary", id: `download-${format}` },
          `${label} (${formatBytes(artifact.size)})`);
        b.addEventListener("click", async () => {
          note.textContent = "";
          try {
            // Links expire: ask for a fresh one at each click.
            const fresh = findAdapter((await api(`/v1/jobs/${job.id}/artifacts`, { signal })).data, format);
            download(fresh.url, fresh.name.split("/").pop());
          } catch (e) {
            if (!signal.aborted) note.replaceChildren(errorBox(describeError(e)));
          }
        });
        buttons.push(b);
      }
      formats.replaceChildren(...(buttons.length ? buttons : [h("p", { class: "muted" }, "No adapter file was stored.")]));
      renderGallery();
    } catch (e) {
      if (!signal.aborted) note.replaceChildren(errorBox(describeError(e)));
    }
  }

  function renderAll() {
    renderHeader();
    renderProgress();
    renderActions();
  }

  // --- events
  function apply(ev) {
    state.log.push(ev);
    const d = ev.data || {};
    switch (ev.type) {
      case "queued":
        if (d.position && job.status === "queued") job.queue_position = d.position;
        break;
      case "started":
        if (!TERMINAL_STATUSES.has(job.status)) job.status = "running";
        break;
      case "training":
        job.progress = { ...(job.progress || { step: d.start_step || 0, loss: null, eta_s: null }), total_steps: d.total_steps };
        break;
      case "progress":
        if (!TERMINAL_STATUSES.has(job.status)) job.status = "running";
        job.progress = { step: d.step, total_steps: d.total_steps, loss: d.loss, eta_s: d.eta_s };
        if (typeof d.elapsed_s === "number") state.elapsed = d.elapsed_s;
        if (typeof d.loss === "number" && Number.isFinite(d.loss)) {
          state.points = state.points.filter((p) => p.step < d.step); // a resumed attempt rewrites later steps
          state.points.push({ step: d.step, loss: d.loss });
          renderChart();
        }
        break;
      case "sample":
        if (Array.isArray(d.images)) {
          state.sawSampleImages = true;
          const group = state.samples.get(d.step) || { final: false, rows: new Map() };
          group.final = group.final || Boolean(d.final);
          for (const im of d.images) addSample(group, im);
          state.samples.set(d.step, group);
          if (d.contact_sheet) state.contactSheets.set(d.step, d.contact_sheet);
          renderGallery();
        }
        break;
      case "cancel_requested":
        job.cancel_requested = true;
        break;
      case "succeeded":
        job.status = "succeeded";
        state.metrics = d;
        break;
      case "failed":
        job.status = "failed";
        job.error = { code: d.code, message: d.message || "" };
        break;
      case "canceled":
        job.status = "canceled";
        break;
      default:
        break;
    }
    scheduleRender();
  }

  let renderQueued = false;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      renderHeader();
      renderProgress();
      renderLog();
      const wasActive = actions.dataset.active === "true";
      const active = !TERMINAL_STATUSES.has(job.status);
      if (wasActive !== active || actions.dataset.cancel !== String(job.cancel_requested)) {
        renderActions();
        actions.dataset.active = String(active);
        actions.dataset.cancel = String(job.cancel_requested);
      }
    });
  }

  renderAll();
  actions.dataset.active = String(!TERMINAL_STATUSES.has(job.status));
  actions.dataset.cancel = String(job.cancel_requested);
  renderChart();
  renderGallery();

  await followEvents(job.id, {
    signal,
    onEvent: apply,
    onError: (e) => {
      if (!signal.aborted) errorSlot.replaceChildren(errorBox(e.status === 404 ? "This job was deleted." : describeError(e)));
    },
  });
  if (signal.aborted) return;
  try {
    job = await api(`/v1/jobs/${job.id}`, { signal });
  } catch {
    return;
  }
  renderAll();
  actions.dataset.active = String(!TERMINAL_STATUSES.has(job.status));
  renderLog();
  renderChart();
  renderGallery();
  await renderResults();
}

// ---------------------------------------------------------------------------------------------------------------

window.addEventListener("hashchange", () => route());
route();
