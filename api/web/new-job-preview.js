// The new-job form's zero-shot preview: the base model shown the reference images before any training
// (POST /v1/previews), followed over its event stream until its images are shown.

import { api, followEvents, TERMINAL_STATUSES } from "./api.js";
import { badge, errorBox, h } from "./dom.js";
import { describeError, sentence, sourceLabel } from "./format.js";
import { draft, formData } from "./new-job-draft.js";

/** The preview box; `start(files, spec)` submits a preview, and a preview already under way is followed again. */
export function previewBox({ signal }) {
  const el = h("section", { class: "preview", id: "preview", "aria-live": "polite", "aria-label": "Zero-shot preview" });

  function render() {
    const p = draft.preview;
    if (!p) {
      el.replaceChildren();
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
    el.replaceChildren(...children);
  }

  function apply(p, ev) {
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
  }

  async function watch() {
    const p = draft.preview;
    if (!p || TERMINAL_STATUSES.has(p.status)) return;
    await followEvents(p.id, {
      signal,
      onEvent: (ev) => {
        apply(p, ev);
        render();
      },
      onError: (e) => {
        p.error = describeError(e);
        render();
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
    render();
  }

  render();
  watch();

  return {
    el,
    /** Submits a preview of `files` with `spec`; throws the API's error (the caller shows it). */
    async start(files, spec) {
      const job = await api("/v1/previews", { method: "POST", body: formData(files, spec), signal });
      draft.preview = { id: job.id, status: job.status, message: "Submitted.", images: [] };
      render();
      watch();
    },
  };
}
