// The job view's sample gallery, filled in as `sample` events arrive: for each step (newest first) and prompt, the
// base model beside the model with the adapter, and what the teacher sees of each reference image; a preview's
// images one per reference image. Once a training job has finished, the images take fresh links from its artifacts.

import { TERMINAL_STATUSES } from "./api.js";
import { h } from "./dom.js";
import { SAMPLE_KIND_LABELS } from "./format.js";

const KIND_ORDER = ["base", "adapter", "teacher", "preview"];

function kindRank(kind) {
  const i = KIND_ORDER.indexOf(kind);
  return i < 0 ? KIND_ORDER.length : i;
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
  const label = perReference ? im.source || SAMPLE_KIND_LABELS[kind] || kind : SAMPLE_KIND_LABELS[kind] || kind;
  row.figures.set(perReference ? `${kind}:${im.source}` : kind, { kind, label, image: im });
  group.rows.set(key, row);
}

/** The gallery card. */
export function galleryCard(ctx) {
  const gallery = h("div", { class: "gallery", id: "gallery" });
  const preview = ctx.job.kind === "preview";
  const el = h("section", { class: "card", "aria-labelledby": "gallery-title" },
    h("h2", { id: "gallery-title" }, preview ? "Preview images" : "Samples"),
    h("p", { class: "muted small" }, preview
      ? "What the model makes of your concept before any training."
      : "For each prompt and step: the base model beside the model with the adapter."),
    gallery);
  const samples = new Map(); // step -> {final, rows: Map(key -> {title, note, figures})}
  const contactSheets = new Map(); // step -> URL
  let sawSampleImages = false;
  let artifacts = null; // the finished job's files, with fresh links

  function freshUrl(item) {
    if (!artifacts || !item.name) return item.url;
    const hit = artifacts.find((a) => a.name === item.name || a.name.endsWith(`/${item.name}`));
    return hit ? hit.url : item.url;
  }

  function emptyGallery() {
    const fallback = (artifacts || []).filter((a) => a.kind === "sample" && a.content_type.startsWith("image/"));
    if (fallback.length && !sawSampleImages) {
      return h("div", { class: "grid" }, fallback.map((a) => h("figure", { class: "sample" },
        h("img", { src: a.url, alt: a.name, loading: "lazy" }), h("figcaption", {}, a.name))));
    }
    return h("p", { class: "muted", id: "gallery-empty" }, TERMINAL_STATUSES.has(ctx.job.status)
      ? "No samples were made." : "Samples appear here as training makes them.");
  }

  function stepSection(step) {
    const group = samples.get(step);
    const sheet = contactSheets.get(step);
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
  }

  function draw() {
    const steps = [...samples.keys()].sort((a, b) => b - a);
    if (!steps.length) gallery.replaceChildren(emptyGallery());
    else gallery.replaceChildren(...steps.map(stepSection));
  }

  draw();
  return {
    el,
    onEvent(ev) {
      const d = ev.data || {};
      if (ev.type !== "sample" || !Array.isArray(d.images)) return;
      sawSampleImages = true;
      const group = samples.get(d.step) || { final: false, rows: new Map() };
      group.final = group.final || Boolean(d.final);
      for (const im of d.images) addSample(group, im);
      samples.set(d.step, group);
      if (d.contact_sheet) contactSheets.set(d.step, d.contact_sheet);
      draw();
    },
    async onEnd() {
      draw();
      if (ctx.job.status !== "succeeded" || ctx.job.kind === "preview") return;
      try {
        artifacts = await ctx.artifacts();
      } catch {
        return; // the results card says why; the events' links stay
      }
      draw();
    },
  };
}
