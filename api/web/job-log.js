// The job view's event log: every event of the job's stream as a sentence with its time (of the many progress
// reports, only the latest is shown).

import { h } from "./dom.js";
import { formatDuration, formatLoss, sentence } from "./format.js";

/** An `evaluated` event as a sentence: "Quick check at step 4: concept learned, few-step quality kept." */
function evaluatedSentence(d) {
  const v = d.verdicts || {};
  const parts = [
    v.concept?.verdict ? `concept ${v.concept.verdict}` : null,
    v.few_step_quality?.verdict ? `few-step quality ${v.few_step_quality.verdict}` : null,
  ].filter(Boolean);
  return `${d.quick ? "Quick check" : "Evaluated"} at step ${d.step ?? "?"}${parts.length ? `: ${parts.join(", ")}` : ""}.`;
}

/** One event as a sentence. */
export function describeEvent(ev) {
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
    case "evaluated":
      return evaluatedSentence(d);
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
    case "warning":
      return `Warning (${d.stage ?? "after training"}): ${sentence(d.message || "a step after training failed; the adapter is kept")}`;
    default:
      return sentence(ev.type.replaceAll("_", " "));
  }
}

/** The events to list: every one but progress reports, and the latest of those in its place. */
function shownEvents(events) {
  const items = [];
  let lastProgress = null;
  for (const ev of events) {
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
  return items;
}

/** The event log card. */
export function logCard() {
  const list = h("ol", { class: "log", id: "event-log" });
  const el = h("section", { class: "card", "aria-labelledby": "log-title" }, h("h2", { id: "log-title" }, "Event log"),
    h("div", { class: "log-wrap" }, list));
  const events = [];
  return {
    el,
    onEvent(ev) {
      events.push(ev);
    },
    render() {
      list.replaceChildren(...shownEvents(events).map((ev) => h("li", { class: `log-${ev.type}`, dataset: { type: ev.type } },
        h("time", { datetime: ev.created_at, class: "muted small" }, new Date(ev.created_at).toLocaleTimeString()),
        " ", describeEvent(ev))));
    },
  };
}
