// The job view's verdict card: did the adapter learn the concept, and did the model keep its few-step quality?
// Once the job has its evaluation report (`job.report`), the two verdicts in words with their summary sentences,
// the step they judged and a table of the figures behind them (mean with its 95% interval, noise floor, verdict,
// or why a figure was not measured). While the job trains, the latest quick check (`evaluated` event) instead.
// A job that continued an earlier one's adapter also shows the report's retention section: did the new adapter
// keep what the earlier one drew (kept / partly / lost), and the figures behind it.

import { h } from "./dom.js";
import { sentence } from "./format.js";

/** The two axes, in the order the card shows them, with their names for people. */
const AXES = [
  ["concept", "Concept"],
  ["few_step_quality", "Few-step quality"],
];

// How each verdict is styled: good, bad (stands out) or unsure. Anything else the service says reads as unsure.
const TONES = {
  learned: "good", kept: "good", "not learned": "bad", degraded: "bad", inconclusive: "unsure", partly: "unsure", lost: "bad",
};

/** A verdict as a word for people ("not learned" -> "Not learned"). */
function verdictWord(verdict) {
  const text = String(verdict ?? "").trim();
  return text ? text[0].toUpperCase() + text.slice(1) : "Unknown";
}

/** A figure's number with three significant digits, as the report's text does ("–" when there is none). */
export function formatFigure(x) {
  return typeof x === "number" && Number.isFinite(x) ? String(Number(x.toPrecision(3))) : "–";
}

/** The mean with its 95% interval: "0.00077 [0.0007, 0.0008]". */
function meanWithInterval(fig) {
  const ci = Array.isArray(fig.ci95) && fig.ci95.length === 2 ? ` [${formatFigure(fig.ci95[0])}, ${formatFigure(fig.ci95[1])}]` : "";
  return `${formatFigure(fig.mean)}${ci}`;
}

/** One axis: its name, the verdict as a styled word and the summary sentence. */
function axisBlock(axis, label, verdict) {
  const word = verdict?.verdict;
  const tone = TONES[word] || "unsure";
  return h("div", { class: `verdict verdict-${tone}`, dataset: { axis, verdict: word ?? "", tone } },
    h("p", { class: "verdict-head" }, h("span", { class: "verdict-axis" }, `${label}: `),
      h("strong", { class: "verdict-word" }, verdictWord(word))),
    verdict?.summary ? h("p", { class: "verdict-summary" }, sentence(verdict.summary)) : null);
}

/** The figures behind the verdicts, one row each (`id` names the table and its caption). */
function figureTable(figures, id = "figures", caption = "The figures behind the verdicts") {
  const rows = Object.entries(figures).map(([name, fig]) => {
    const title = h("th", { scope: "row" }, fig.title || name, fig.unit ? h("span", { class: "muted small figure-unit" }, fig.unit) : null);
    if (fig.not_measured) {
      return h("tr", { dataset: { figure: name, verdict: "not measured" } }, title,
        h("td", { colspan: 3, class: "muted" }, `Not measured: ${sentence(fig.not_measured)}`));
    }
    const tone = TONES[fig.verdict] || "";
    return h("tr", { dataset: { figure: name, verdict: fig.verdict ?? "" } }, title,
      h("td", { class: "num" }, meanWithInterval(fig)),
      h("td", { class: "num" }, formatFigure(fig.noise_floor)),
      h("td", { class: tone ? `figure-verdict verdict-text-${tone}` : "figure-verdict" }, verdictWord(fig.verdict)));
  });
  // On a narrow screen the table scrolls by itself (focusable, so the keyboard can scroll it too).
  return h("div", { class: "table-wrap", tabindex: 0, role: "region", "aria-labelledby": `${id}-caption` },
    h("table", { class: "figures", id },
      h("caption", { id: `${id}-caption` }, caption),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Figure"), h("th", { scope: "col" }, "Mean [95% interval]"),
        h("th", { scope: "col" }, "Noise floor"), h("th", { scope: "col" }, "Verdict"))),
      h("tbody", {}, rows)));
}

/** The retention section of a continued job's report: the verdict, its sentence, what was rendered again. */
function retentionBlock(retention, earlier) {
  const word = retention.verdict;
  const tone = TONES[word] || "unsure";
  const cases = Array.isArray(retention.cases) ? retention.cases.length : 0;
  const figures = retention.figures && Object.keys(retention.figures).length ? retention.figures : null;
  return h("div", { class: "retention", id: "retention", dataset: { verdict: word ?? "", tone } },
    h("h3", {}, "Did it keep the adapter it continued?"),
    h("div", { class: `verdict verdict-${tone}` },
      h("p", { class: "verdict-head" }, h("span", { class: "verdict-axis" }, "Retention: "),
        h("strong", { class: "verdict-word" }, verdictWord(word))),
      retention.summary ? h("p", { class: "verdict-summary" }, sentence(retention.summary)) : null),
    cases ? h("p", { class: "muted small" }, `The ${cases} final ${cases === 1 ? "sample" : "samples"} of `,
      earlier ? h("a", { href: `#/jobs/${earlier}` }, `job ${String(earlier).slice(0, 8)}`) : "the earlier job",
      " rendered again with this adapter at the same prompts, seeds and settings, and compared with the base ",
      "model's renders of them (1 = drawn again exactly, 0 = as far from them as the base model).") : null,
    figures ? figureTable(figures, "retention-figures", "The figures behind the retention verdict") : null);
}

/** What was judged, in a sentence: the report's step and seeds, or the quick check's step. */
function judgedLine(source, state) {
  if (source === "report") {
    const seeds = state.setting?.seeds?.length;
    const kind = state.quick ? "A quick check" : "Judged";
    return `${kind} at step ${state.step ?? "?"}${seeds ? `, on ${seeds} ${seeds === 1 ? "seed" : "seeds"}` : ""}, against the base model on the same seeds.`;
  }
  if (state.quick) return `Quick check at step ${state.step ?? "?"} (one seed, indicative); the full evaluation comes when training ends.`;
  return `Judged at step ${state.step ?? "?"}; the figures follow when the job's report is read.`;
}

/** The verdict card (hidden until the job has a quick check or a report; never on a preview). */
export function verdictCard(ctx) {
  const el = h("section", { class: "card verdict-card", id: "verdict", hidden: true, "aria-labelledby": "verdict-title" });
  let latest = null; // the latest `evaluated` event's data: {step, quick, verdicts}
  let drawn = null; // what is on screen, so that unchanged states are not redrawn

  function render() {
    const report = ctx.job.report;
    const source = report && report.verdicts ? "report" : latest ? "event" : null;
    if (!source || ctx.job.kind === "preview") {
      el.hidden = true;
      return;
    }
    const state = source === "report" ? report : latest;
    if (drawn === state) return;
    drawn = state;
    el.hidden = false;
    el.dataset.source = source === "report" ? "report" : state.quick ? "quick" : "final";
    el.dataset.step = String(state.step ?? "");
    const verdicts = state.verdicts || {};
    el.replaceChildren(
      h("h2", { id: "verdict-title" }, "Did it work?"),
      h("p", { class: "muted small", id: "verdict-step", "aria-live": "polite" }, judgedLine(source, state)),
      h("div", { class: "verdicts" }, AXES.map(([axis, label]) => axisBlock(axis, label, verdicts[axis]))),
      source === "report" && report.figures && Object.keys(report.figures).length ? figureTable(report.figures) : null,
      source === "report" && report.retention ? retentionBlock(report.retention, ctx.job.config?.init_adapter) : null,
    );
  }

  return {
    el,
    onEvent(ev) {
      if (ev.type === "evaluated" && ev.data && typeof ev.data === "object" && ev.data.verdicts) latest = ev.data;
    },
    render,
  };
}
