// The new-job form's state, kept while the tab moves between views: the chosen files (each with its check result
// and caption) and the settings, and how they become a request: the spec JSON, the multipart body, a dry run.

import { api } from "./api.js";

/** The page's first validation prompt for a model that names none of its own. */
export const PAGE_PROMPT = "a photo of [V]";

/** The form as the person left it. Trigger and default caption start from the API's defaults (see `startDraft`),
 * or the chosen model's own (new-job.js). */
export const draft = {
  files: [], // {uid, file, name, size, url, status: "checking"|"ok"|"refused"|"unchecked", reason, caption, li}
  preset: "",
  trigger: "",
  defaultCaption: "",
  steps: "",
  sampleEvery: "",
  // The page's own starting points (one seed, one prompt: a quick first job), not the API's defaults.
  seeds: "0",
  prompts: PAGE_PROMPT,
  formats: { diffusers: true, comfyui: true },
  initAdapter: null, // the id of the succeeded job this one continues ("Continue training" on its page), or null
  preview: null, // {id, status, message, images, error}
  idempotencyKey: null,
  dryRunUnsupported: false,
  started: false,
  specDefaults: { trigger: "", defaultCaption: "" }, // the JobSpec's own defaults, once loaded
};

/** Fills the trigger word and default caption with the JobSpec's defaults, once per tab, where still empty. */
export function startDraft(fields) {
  if (draft.started) return;
  const trigger = fields.field("trigger").default;
  const caption = fields.field("default_caption").default;
  if (trigger === undefined && caption === undefined) return; // no schema: try again at the next visit
  draft.started = true;
  draft.specDefaults = {
    trigger: typeof trigger === "string" ? trigger : "", defaultCaption: typeof caption === "string" ? caption : "",
  };
  if (!draft.trigger) draft.trigger = draft.specDefaults.trigger;
  if (!draft.defaultCaption) draft.defaultCaption = draft.specDefaults.defaultCaption;
}

export function parseSeeds(text) {
  return String(text).split(/[\s,]+/).filter(Boolean).map(Number).filter((n) => Number.isInteger(n) && n >= 0);
}

/** Prepares the form to continue `job` (a succeeded training job): its adapter, its preset and its trigger word
 * (a new concept on top takes another one); images and the other settings stay as the person left them. */
export function continueFrom(job) {
  draft.initAdapter = job.id;
  draft.preset = job.preset;
  if (job.config?.trigger) draft.trigger = job.config.trigger;
  draft.idempotencyKey = null;
}

/** The files the job will be made of: every one not refused. */
export function usableFiles() {
  return draft.files.filter((f) => f.status === "ok" || f.status === "unchecked");
}

/** The spec of the draft: only what the person set (a field left empty takes the API's default). */
export function buildSpec() {
  const spec = { preset: draft.preset };
  const trigger = draft.trigger.trim();
  if (trigger) spec.trigger = trigger;
  const defaultCaption = draft.defaultCaption.trim();
  if (defaultCaption) spec.default_caption = defaultCaption;
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
  if (draft.initAdapter) spec.init_adapter = draft.initAdapter;
  return spec;
}

/** The multipart body of POST /v1/jobs and /v1/previews: the images and the spec as JSON. */
export function formData(files, spec) {
  const form = new FormData();
  for (const f of files) form.append("images", f.file, f.name);
  form.append("spec", JSON.stringify(spec));
  return form;
}

/** What submitting `files` with `spec` would do (null when the service cannot tell without making the job). */
export async function dryRun(files, spec, signal) {
  const result = await api("/v1/jobs?dry_run=true", { method: "POST", body: formData(files, spec), signal });
  if (!result || result.dry_run !== true) {
    // A server without dry runs created a real job: remove it, and check files only at submission from now on.
    draft.dryRunUnsupported = true;
    if (result && result.id) await api(`/v1/jobs/${result.id}`, { method: "DELETE" }).catch(() => {});
    return null;
  }
  return result;
}
