// The words and numbers the page shows: durations, sizes, times and losses formatted, labels of job statuses and
// sample kinds, and an API error turned into a sentence (the API's message, the refused file, the invalid field).

import { ApiError } from "./api.js";

/** `text` as a sentence: backticks dropped, a capital first letter and a full stop at the end. */
export function sentence(text) {
  let t = String(text ?? "").replaceAll("`", "").trim();
  if (!t) return "";
  t = t[0].toUpperCase() + t.slice(1);
  return /[.!?)]$/.test(t) ? t : `${t}.`;
}

/** The first eight characters of a job id, as the page names jobs. */
export function shortId(id) {
  return String(id).slice(0, 8);
}

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "";
  if (seconds < 9.95) return `${Math.max(0, seconds).toFixed(1)} s`;
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

export function formatTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? "" : d.toLocaleString();
}

export function formatLoss(x) {
  return typeof x === "number" && Number.isFinite(x) ? x.toPrecision(4) : "–";
}

/** An estimate in GPU-seconds, with minutes or hours beside it when it is a minute or more. */
export function gpuSeconds(x) {
  const n = Math.max(1, Math.round(x));
  const text = `${n.toLocaleString("en")} GPU-second${n === 1 ? "" : "s"}`;
  return n >= 60 ? `${text} (${formatDuration(n)})` : text;
}

export function statusLabel(status) {
  return { queued: "Queued", running: "Running", succeeded: "Finished", failed: "Failed", canceled: "Canceled" }[
    status
  ] ?? status;
}

export function kindLabel(job) {
  return job.kind === "preview" ? "Preview" : "Training job";
}

/** What made a sample image (the `kind` of a sample event's image), in the order the gallery shows them. */
export const SAMPLE_KIND_LABELS = {
  base: "Base model", adapter: "With adapter", teacher: "Teacher (sees the image)", preview: "Zero-shot preview",
};

export function sourceLabel(source) {
  return SAMPLE_KIND_LABELS[source] ? SAMPLE_KIND_LABELS[source].toLowerCase() : `from ${source}`;
}

// The spec's fields as the new-job form labels them, for validation errors that name a field.
const FIELD_NAMES = {
  steps: "Steps", sample_every: "Sample every", sample_seeds: "Seeds", validation_prompts: "Prompts",
  trigger: "Trigger word", default_caption: "Default caption", captions: "Captions", preset: "Model",
  output_formats: "Download formats", learning_rate: "Learning rate",
};

/** An error as one sentence for a person: never a code or a stack trace ("" for an aborted request). */
export function describeError(e) {
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
