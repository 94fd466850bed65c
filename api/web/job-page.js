// The job view (#/jobs/<id>): reads the job, lays out its cards and follows its event stream (reconnecting with
// Last-Event-ID, no polling), handing every event to the cards; once the job has finished it is read again and
// each card draws its last state. The cards live in modules of their own.
//
// A card is a function of the page's context, `card(ctx)`, returning `{ el, onEvent?, render?, onEnd? }`:
//   el       its element (a fragment for several), placed once, in the order of LAYOUT;
//   onEvent  called with each event of the stream after the page has applied it to ctx.job (a card keeps its
//            own data: loss points, samples, log lines, and redraws what they change);
//   render   redraws from ctx.job: at the start, at most once per animation frame after events, at once after an
//            action (ctx.refresh()) and at the end;
//   onEnd    the stream has ended and ctx.job was read again: the final drawing (it may fetch; nobody waits).
// The context: `ctx.job` (the job as last known), `ctx.signal` (aborted when the view is left), `ctx.artifacts()`
// (GET /v1/jobs/{id}/artifacts, asked once and shared), `ctx.refresh()`, and `ctx.showError(text)` (the status
// card puts the sentence under the progress bar). A new card is one such function, added to LAYOUT.

import { api, ApiError, followEvents, TERMINAL_STATUSES } from "./api.js";
import { errorBox, focusHeading, h, main } from "./dom.js";
import { describeError } from "./format.js";
import { tryCard } from "./generate.js";
import { galleryCard } from "./job-gallery.js";
import { lossCard } from "./job-chart.js";
import { logCard } from "./job-log.js";
import { resultsCard } from "./job-results.js";
import { headerPart, statusCard } from "./job-status.js";
import { verdictCard } from "./job-verdict.js";

// Top to bottom; cards in one row stand side by side on a wide screen.
const LAYOUT = [[headerPart], [statusCard], [verdictCard], [resultsCard], [tryCard], [lossCard, logCard], [galleryCard]];

/** What an event says about the job itself (status, progress, error); the cards read the rest. */
function applyToJob(job, ev) {
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
      break;
    case "cancel_requested":
      job.cancel_requested = true;
      break;
    case "succeeded":
    case "canceled":
      job.status = ev.type;
      break;
    case "failed":
      job.status = "failed";
      job.error = { code: d.code, message: d.message || "" };
      break;
    default:
      break;
  }
}

function notFound(e) {
  const text = e instanceof ApiError && e.status === 404 ? "This job does not exist, or it was deleted." : describeError(e);
  main.replaceChildren(h("div", { class: "page" }, h("h1", {}, "Job not found"), errorBox(text),
    h("p", {}, h("a", { href: "#/jobs" }, "Back to the jobs"))));
  focusHeading();
}

export async function viewJob(signal, id) {
  main.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  let job;
  try {
    job = await api(`/v1/jobs/${id}`, { signal });
  } catch (e) {
    if (!signal.aborted) notFound(e);
    return;
  }
  if (signal.aborted) return;

  let artifacts = null;
  const ctx = {
    job,
    signal,
    artifacts() {
      artifacts ??= api(`/v1/jobs/${id}/artifacts`, { signal }).then((page) => page.data);
      return artifacts;
    },
    refresh: () => renderAll(),
    showError: () => {}, // the status card's
  };

  const page = h("div", { class: "page job-page" });
  const cards = [];
  for (const row of LAYOUT) {
    const made = row.map((card) => card(ctx));
    cards.push(...made);
    page.append(made.length > 1 ? h("div", { class: "two" }, made.map((c) => c.el)) : made[0].el);
  }
  function renderAll() {
    for (const c of cards) c.render?.();
  }

  renderAll();
  main.replaceChildren(page);
  focusHeading();

  let renderQueued = false;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      renderAll();
    });
  }

  await followEvents(id, {
    signal,
    onEvent: (ev) => {
      applyToJob(ctx.job, ev);
      for (const c of cards) c.onEvent?.(ev);
      scheduleRender();
    },
    onError: (e) => {
      if (!signal.aborted) ctx.showError(e.status === 404 ? "This job was deleted." : describeError(e));
    },
  });
  if (signal.aborted) return;
  try {
    ctx.job = await api(`/v1/jobs/${id}`, { signal });
  } catch {
    return;
  }
  renderAll();
  for (const c of cards) c.onEnd?.();
}
