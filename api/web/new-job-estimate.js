// The new-job form's estimate: a dry run of the whole submission, a moment after the last change, showing the
// estimated GPU time and the queue position before anything is created.

import { errorBox, h } from "./dom.js";
import { describeError, gpuSeconds } from "./format.js";
import { buildSpec, draft, dryRun, usableFiles } from "./new-job-draft.js";

/** The estimate box; `schedule()` asks for a new estimate. `onRefused(error)` hears of a file the API refused. */
export function estimateBox({ signal, onRefused }) {
  const el = h("div", { class: "estimate", id: "estimate", role: "status", "aria-live": "polite" },
    h("span", { class: "muted" }, "Add images to see an estimate."));

  let timer = null;
  let running = null;

  async function run() {
    running?.abort();
    if (signal.aborted || !draft.preset) return;
    const files = usableFiles();
    if (!files.length || draft.files.some((f) => f.status === "checking")) {
      el.replaceChildren(h("span", { class: "muted" },
        files.length ? "Checking images…" : "Add images to see an estimate."));
      return;
    }
    if (draft.dryRunUnsupported) {
      el.replaceChildren(h("span", { class: "muted" }, "This service gives no estimate before submission."));
      return;
    }
    running = new AbortController();
    const local = running;
    signal.addEventListener("abort", () => local.abort(), { once: true });
    el.classList.add("busy");
    try {
      const r = await dryRun(files, buildSpec(), local.signal);
      if (!r) return;
      const total = r.config?.max_train_steps;
      el.replaceChildren(
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
      onRefused(e);
      el.replaceChildren(errorBox(describeError(e)));
    } finally {
      el.classList.remove("busy");
    }
  }

  return {
    el,
    schedule() {
      clearTimeout(timer);
      timer = setTimeout(run, 400);
    },
  };
}
