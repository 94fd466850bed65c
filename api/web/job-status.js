// The top of the job view: the title with the status badge and a line of facts, then the status card: the
// progress bar with step, ETA, elapsed time and loss, the job's error, and the actions (cancel while it runs,
// delete with a confirmation at any time).

import { api, TERMINAL_STATUSES } from "./api.js";
import { badge, errorBox, h, toast } from "./dom.js";
import { describeError, formatDuration, formatLoss, formatTime, kindLabel, sentence, shortId } from "./format.js";

/** The heading and the facts line under it. */
export function headerPart(ctx) {
  const badgeSlot = h("span", { id: "job-status" });
  const meta = h("p", { class: "muted" });
  const el = new DocumentFragment();
  el.append(h("div", { class: "page-head" }, h("h1", {}, `${kindLabel(ctx.job)} ${shortId(ctx.job.id)} `), badgeSlot), meta);
  return {
    el,
    render() {
      const job = ctx.job;
      badgeSlot.replaceChildren(badge(job.status));
      const bits = [job.preset, `${job.images.length} ${job.images.length === 1 ? "image" : "images"}`, `created ${formatTime(job.created_at)}`];
      if (job.finished_at) bits.push(`finished ${formatTime(job.finished_at)}`);
      if (typeof job.gpu_seconds === "number" && job.gpu_seconds > 0) bits.push(`${formatDuration(job.gpu_seconds)} GPU time`);
      meta.textContent = bits.join(" · ");
    },
  };
}

function progressSentence(job, elapsed) {
  const p = job.progress;
  const total = p?.total_steps || job.config?.max_train_steps || 0;
  const step = p?.step || 0;
  if (job.status === "queued") {
    return job.queue_position ? `Waiting in the queue: position ${job.queue_position}.` : "Waiting in the queue.";
  }
  if (job.status === "running") {
    let text = p && p.total_steps ? `Step ${p.step} of ${p.total_steps}` : "Starting…";
    if (p && p.total_steps) {
      if (p.eta_s !== null && p.eta_s !== undefined) text += ` · about ${formatDuration(p.eta_s)} left`;
      if (elapsed) text += ` · ${formatDuration(elapsed)} elapsed`;
      if (typeof p.loss === "number") text += ` · loss ${formatLoss(p.loss)}`;
    }
    if (job.cancel_requested) text += " · stopping…";
    return text;
  }
  if (job.status === "succeeded") return total ? `Finished: ${total} of ${total} steps.` : "Finished.";
  if (job.status === "failed") return step ? `Failed at step ${step}.` : "Failed.";
  return step ? `Canceled at step ${step}.` : "Canceled.";
}

/** Progress, the job's error and its actions. */
export function statusCard(ctx) {
  const { signal } = ctx;
  const progressBar = h("progress", { id: "job-progress", max: 1, value: 0, "aria-label": "Training progress" });
  const progressText = h("p", { id: "progress-text", class: "progress-text", "aria-live": "polite" });
  const errorSlot = h("div", { id: "job-error" });
  const actions = h("div", { class: "actions", id: "job-actions" });
  const el = h("section", { class: "card status-card", "aria-label": "Progress" }, progressBar, progressText, errorSlot, actions);
  let elapsed = null; // seconds, as the latest progress report says
  ctx.showError = (text) => errorSlot.replaceChildren(errorBox(text));

  function renderProgress() {
    const job = ctx.job;
    const total = job.progress?.total_steps || job.config?.max_train_steps || 0;
    const step = job.progress?.step || 0;
    if (total) {
      progressBar.max = total;
      progressBar.value = job.status === "succeeded" ? total : step;
    } else {
      progressBar.removeAttribute("value");
    }
    progressBar.setAttribute("aria-valuetext", total ? `Step ${step} of ${total}` : "Not started");
    progressText.textContent = progressSentence(job, elapsed);
    progressText.dataset.step = String(step);
    progressText.dataset.total = String(total);
    errorSlot.replaceChildren(job.error ? errorBox(sentence(job.error.message || job.error.code)) : "");
  }

  function cancelButton() {
    const job = ctx.job;
    const cancel = h("button", { type: "button", class: "secondary", id: "cancel-button", disabled: job.cancel_requested },
      job.cancel_requested ? "Stopping…" : "Cancel job");
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        ctx.job = await api(`/v1/jobs/${job.id}/cancel`, { method: "POST", signal });
        toast(ctx.job.status === "canceled" ? "The job was canceled." : "Cancel requested; the job stops within one step.");
        shown = null; // the buttons as the answer says
        ctx.refresh();
      } catch (e) {
        if (!signal.aborted) {
          cancel.disabled = false;
          errorSlot.replaceChildren(errorBox(describeError(e)));
        }
      }
    });
    return cancel;
  }

  function deleteButton() {
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
          await api(`/v1/jobs/${ctx.job.id}`, { method: "DELETE", signal });
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
    return del;
  }

  // The buttons are redrawn only when what they offer changes (a confirmation being answered stays open).
  let shown = null;
  function renderActions() {
    const active = !TERMINAL_STATUSES.has(ctx.job.status);
    const now = `${active}/${ctx.job.cancel_requested}`;
    if (now === shown) return;
    shown = now;
    actions.replaceChildren(...(active ? [cancelButton()] : []), deleteButton());
  }

  return {
    el,
    onEvent(ev) {
      if (ev.type === "progress" && typeof ev.data?.elapsed_s === "number") elapsed = ev.data.elapsed_s;
    },
    render() {
      renderProgress();
      renderActions();
    },
  };
}
