// The web page of the fine-tuning service, a client of the public REST API and nothing more: this entry module
// routes between the views (#/new, #/jobs, #/jobs/<id>, #/generations, and the key form while the tab has no key) and shows the
// key box in the header. Plain ES modules, no build step:
//   api.js             the REST client (Bearer key, errors, the job's event stream over fetch)
//   service-info.js    presets and the JobSpec's bounds and defaults, as the API publishes them
//   dom.js, format.js  element builders and shared pieces; the words and numbers the page shows
//   key-form.js        the key form
//   new-job*.js        the new-job form: layout and submit, its state, images, estimate, preview
//   job-list.js        the job list
//   job-page.js        the job view and its cards: job-status, job-results, job-chart, job-log, job-gallery
//   generate.js        the job view's "Try it" card and the gallery of generations (#/generations)

import { clearKey, getKey, whenKeyRejected } from "./api.js";
import { h, main } from "./dom.js";
import { viewGenerations } from "./generate.js";
import { viewJobs } from "./job-list.js";
import { viewJob } from "./job-page.js";
import { viewKey } from "./key-form.js";
import { viewNew } from "./new-job.js";

let viewAbort = null;

/** Shows the view of the address's #fragment (the key form while there is no key, with `message` if given). */
function route(message) {
  viewAbort?.abort();
  viewAbort = new AbortController();
  const signal = viewAbort.signal;
  renderKeybox();
  main.replaceChildren();
  window.scrollTo(0, 0);
  const hash = location.hash || "#/new";
  for (const a of document.querySelectorAll("[data-nav]")) {
    const active = hash.startsWith(`#/${a.dataset.nav}`);
    if (active) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (!getKey()) {
    viewKey(typeof message === "string" ? message : "", () => {
      if (!location.hash || location.hash === "#/") location.hash = "#/new";
      route();
    });
    return;
  }
  let m;
  if (hash === "#/new") viewNew(signal);
  else if (hash === "#/jobs") viewJobs(signal);
  else if (hash === "#/generations") viewGenerations(signal);
  else if ((m = hash.match(/^#\/jobs\/([0-9a-fA-F-]{36})$/))) viewJob(signal, m[1].toLowerCase());
  else location.replace("#/new");
}

function renderKeybox() {
  const box = document.getElementById("keybox");
  const key = getKey();
  if (!key) {
    box.replaceChildren();
    return;
  }
  box.replaceChildren(
    h("span", { class: "muted" }, `Key …${key.slice(-4)}`),
    h("button", {
      type: "button", class: "link", onclick: () => {
        clearKey();
        route("You are signed out of this tab. Enter a key to continue.");
      },
    }, "Sign out"),
  );
}

whenKeyRejected((message) => route(message));
window.addEventListener("hashchange", () => route());
route();
