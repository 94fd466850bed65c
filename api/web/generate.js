// Generations on the page: the "Try it" card of a succeeded training job (prompt, seeds, the adapter's scale, an
// optional second adapter of the key, and the base model beside it for comparison) and the gallery of the key's
// generations (#/generations). Both are clients of /v1/generations and follow a generation's event stream to its
// end (no polling), then read it once for its images' links.

import { api, ApiError, followEvents, TERMINAL_STATUSES } from "./api.js";
import { badge, errorBox, focusHeading, h, main } from "./dom.js";
import { describeError, formatTime, shortId } from "./format.js";

const MAX_SEEDS = 8;

/** Seeds from a text like "0, 1 2": integers, at most MAX_SEEDS; throws a readable Error otherwise. */
export function parseSeeds(text) {
  const parts = String(text).split(/[\s,]+/).filter(Boolean);
  if (!parts.length) throw new Error("Give at least one seed (for example 0).");
  if (parts.length > MAX_SEEDS) throw new Error(`At most ${MAX_SEEDS} seeds.`);
  return parts.map((p) => {
    if (!/^\d+$/.test(p) || Number(p) > 4294967295) throw new Error(`Not a seed: ${p} (whole numbers from 0).`);
    return Number(p);
  });
}

/** Submits one generation and resolves to it once it has ended (its `status` says how). */
export async function runGeneration(body, signal) {
  const submitted = await api("/v1/generations", {
    method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" }, signal,
  });
  await new Promise((resolve, reject) => {
    followEvents(submitted.id, {
      signal, onEvent: () => {}, onEnd: resolve, onError: reject,
    });
  });
  return api(`/v1/generations/${submitted.id}`, { signal });
}

function figure(image, label) {
  return h("figure", { class: "sample sample-generation" },
    h("img", { src: image.url, loading: "lazy", width: 256, height: 256, alt: `${label}: ${image.prompt}, seed ${image.seed}` }),
    h("figcaption", {}, `${label} · seed ${image.seed}`));
}

/** The rows of a finished generation (with the base model's images beside them, when there are). */
function resultRows(tuned, base) {
  if (tuned.status !== "succeeded") {
    const err = tuned.error || {};
    return [errorBox(`The generation ${tuned.status}${err.message ? `: ${err.message}` : "."}`)];
  }
  return tuned.images.map((image, i) => h("div", { class: "sample-row" },
    h("p", { class: "sample-prompt" }, `“${image.prompt}”`),
    h("div", { class: "sample-pair" },
      base && base.status === "succeeded" && base.images[i] ? figure(base.images[i], "Base model") : null,
      figure(image, "With the adapter"))));
}

/** The "Try it" card of the job view: shown on a succeeded training job. */
export function tryCard(ctx) {
  const el = h("section", { class: "card", id: "try-card", "aria-labelledby": "try-title", hidden: true });
  let drawn = false;

  async function draw() {
    const job = ctx.job;
    if (drawn || job.kind !== "training" || job.status !== "succeeded") return;
    drawn = true;
    el.hidden = false;
    const trigger = (job.config && job.config.trigger) || "";
    // The job's own first validation prompt: a closed-vocabulary model (`shapes`) knows no "photo".
    const firstPrompt = job.config?.validation_prompts?.[0] || "a photo of [V]";
    const prompt = h("input", { id: "try-prompt", type: "text", value: firstPrompt, maxlength: 1000, required: true });
    const seeds = h("input", { id: "try-seeds", type: "text", value: "0, 1", inputmode: "numeric" });
    const scale = h("input", { id: "try-scale", type: "number", value: "1", min: "-2", max: "4", step: "0.05" });
    const compare = h("input", { id: "try-compare", type: "checkbox", checked: true });
    const second = h("select", { id: "try-second" }, h("option", { value: "" }, "None"));
    const secondScale = h("input", { id: "try-second-scale", type: "number", value: "1", min: "-2", max: "4", step: "0.05" });
    const button = h("button", { type: "submit", class: "primary", id: "try-generate" }, "Generate");
    const status = h("p", { class: "muted small", id: "try-status", "aria-live": "polite" });
    const results = h("div", { class: "gallery", id: "try-results" });
    const form = h("form", { class: "try-form" },
      h("div", { class: "field" }, h("label", { for: "try-prompt" }, "Prompt"), prompt,
        h("p", { class: "muted small" }, trigger ? `[V] becomes “${trigger}”, the trigger word of this job.` : "")),
      h("div", { class: "field-row" },
        h("div", { class: "field" }, h("label", { for: "try-seeds" }, "Seeds"), seeds),
        h("div", { class: "field" }, h("label", { for: "try-scale" }, "Adapter scale"), scale)),
      h("div", { class: "field-row" },
        h("div", { class: "field" }, h("label", { for: "try-second" }, "Second adapter"), second),
        h("div", { class: "field" }, h("label", { for: "try-second-scale" }, "Its scale"), secondScale)),
      h("label", { class: "check" }, compare, " Show the base model beside it (same seeds)"),
      h("div", { class: "actions" }, button, h("a", { href: "#/generations", class: "small" }, "All generations")),
      status);
    el.replaceChildren(h("h2", { id: "try-title" }, "Try it"),
      h("p", { class: "muted small" }, "Make images with this adapter, at the model's native few-step setting."),
      form, results);
    try { // the key's other adapters of this preset, for combined concepts
      const page = await api(`/v1/jobs?status=succeeded&limit=50`, { signal: ctx.signal });
      for (const other of page.data) {
        if (other.id === job.id || other.preset !== job.preset) continue;
        second.append(h("option", { value: other.id }, `${shortId(other.id)} · ${(other.config && other.config.trigger) || ""} · ${formatTime(other.created_at)}`));
      }
    } catch {
      // the second adapter stays "None"
    }
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      let seedList;
      try {
        seedList = parseSeeds(seeds.value);
      } catch (err) {
        status.replaceChildren(errorBox(err.message));
        return;
      }
      const adapters = [{ job_id: job.id, scale: Number(scale.value) }];
      if (second.value) adapters.push({ job_id: second.value, scale: Number(secondScale.value) });
      const body = { preset: job.preset, prompt: prompt.value, seeds: seedList, adapters };
      const basePrompt = trigger ? prompt.value.replaceAll("[V]", trigger) : prompt.value;
      button.disabled = true;
      status.replaceChildren("Generating…");
      try {
        const [tuned, base] = await Promise.all([
          runGeneration(body, ctx.signal),
          compare.checked ? runGeneration({ preset: job.preset, prompt: basePrompt, seeds: seedList }, ctx.signal) : null,
        ]);
        results.replaceChildren(...resultRows(tuned, base));
        status.replaceChildren(tuned.status === "succeeded" ? `Done: generation ${shortId(tuned.id)}.` : "");
      } catch (err) {
        if (ctx.signal.aborted) return;
        status.replaceChildren(errorBox(err instanceof ApiError ? describeError(err) : String(err)));
      } finally {
        button.disabled = false;
      }
    });
  }

  return { el, render: draw, onEnd: draw };
}

/** The gallery of the key's generations (#/generations), newest first, paged with "Show more". */
export function viewGenerations(signal) {
  const list = h("div", { class: "generation-list", id: "generation-list" });
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "Show more");
  const message = h("div");
  main.replaceChildren(h("div", { class: "page" },
    h("div", { class: "page-head" }, h("h1", {}, "Generations")),
    h("p", { class: "muted" }, "Images made with your adapters. Open a finished job and use “Try it” to make more."),
    message, list, h("div", { class: "actions" }, more)));
  focusHeading();
  let cursor = null;

  function entry(g) {
    const images = g.images.map((image) => figure(image, g.adapters.length ? "With adapters" : "Base model"));
    const adapters = g.adapters.map((a) => h("a", { href: `#/jobs/${a.job_id}` }, `${shortId(a.job_id)} ×${a.scale}`));
    return h("section", { class: "card generation", dataset: { id: g.id, status: g.status } },
      h("div", { class: "job-row-main" }, h("strong", {}, `“${g.prompts.join("”, “")}”`), badge(g.status)),
      h("p", { class: "muted small" }, `${g.preset} · ${g.width}×${g.height} · ${g.steps} steps · ${formatTime(g.created_at)}`,
        adapters.length ? [" · adapters ", adapters.flatMap((a, i) => (i ? [", ", a] : [a]))] : " · no adapter"),
      TERMINAL_STATUSES.has(g.status) && g.status !== "succeeded"
        ? errorBox(`${g.status}${g.error ? `: ${g.error.message}` : ""}`)
        : h("div", { class: "sample-pair" }, images));
  }

  async function load() {
    more.disabled = true;
    try {
      const page = await api(`/v1/generations?limit=20${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`, { signal });
      if (!cursor && !page.data.length) list.replaceChildren(h("p", { class: "muted", id: "generations-empty" }, "No generations yet."));
      else list.append(...page.data.map(entry));
      cursor = page.next_cursor;
      more.hidden = !cursor;
    } catch (err) {
      if (!signal.aborted) message.replaceChildren(errorBox(describeError(err)));
    } finally {
      more.disabled = false;
    }
  }

  more.addEventListener("click", load);
  load();
}
