// The job list (#/jobs): the key's jobs, newest first, filtered by status and paged with "Show more"; queued and
// running ones update live from their event streams (a few at once: a browser opens six connections per host).

import { api, followEvents, TERMINAL_STATUSES } from "./api.js";
import { badge, errorBox, focusHeading, h, main } from "./dom.js";
import { describeError, formatDuration, formatTime, kindLabel, shortId, statusLabel } from "./format.js";

const MAX_LIST_STREAMS = 4; // of the browser's six connections per host, leave room for ordinary requests
const PAGE_SIZE = 20;

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

/** What an event of a job's stream changes in its row. */
function applyToRow(job, ev) {
  const d = ev.data || {};
  if (ev.type === "started") job.status = "running";
  else if (ev.type === "queued" && d.position) job.queue_position = d.position;
  else if (ev.type === "progress") {
    job.status = "running";
    job.progress = { step: d.step, total_steps: d.total_steps, loss: d.loss, eta_s: d.eta_s };
  } else if (TERMINAL_STATUSES.has(ev.type)) job.status = ev.type;
}

export function viewJobs(signal) {
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
        applyToRow(entry.job, ev);
        renderRow(entry.job);
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
