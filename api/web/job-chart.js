// The job view's loss card: the training loss of every progress report as an inline SVG line chart, redrawn at
// most once per animation frame while reports arrive.

import { h, svg } from "./dom.js";
import { formatLoss } from "./format.js";

/** The chart of `points` ({step, loss}, in step order): the steps so far across, the loss range up. */
export function lossChart(points) {
  const W = 640;
  const H = 220;
  const pad = { l: 74, r: 12, t: 12, b: 32 };
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", id: "loss-chart" });
  const latest = points[points.length - 1];
  chart.setAttribute("aria-label", points.length
    ? `Training loss over ${points.length} reports; latest ${formatLoss(latest.loss)} at step ${latest.step}.`
    : "Training loss: no reports yet.");
  if (!points.length) {
    chart.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "chart-empty" }, "No loss reported yet"));
    return chart;
  }
  const maxStep = Math.max(latest.step, 1); // the steps so far: the curve fills the chart from the first report
  let lo = Math.min(...points.map((p) => p.loss));
  let hi = Math.max(...points.map((p) => p.loss));
  if (hi - lo < 1e-12) {
    hi += Math.abs(hi) * 0.05 || 1e-3;
    lo -= Math.abs(lo) * 0.05 || 1e-3;
  }
  const x = (step) => pad.l + ((W - pad.l - pad.r) * step) / maxStep;
  const y = (loss) => pad.t + ((H - pad.t - pad.b) * (hi - loss)) / (hi - lo);
  const grid = [hi, (hi + lo) / 2, lo].map((v) => svg("g", {},
    svg("line", { x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v), class: "chart-grid" }),
    svg("text", { x: pad.l - 6, y: y(v) + 4, "text-anchor": "end", class: "chart-label" }, formatLoss(v))));
  const xLabels = [0, maxStep].map((s) => svg("text", {
    x: x(s), y: H - 10, "text-anchor": s ? "end" : "start", class: "chart-label",
  }, s ? `step ${s}` : "0"));
  chart.append(...grid, ...xLabels,
    svg("polyline", { class: "chart-line", points: points.map((p) => `${x(p.step).toFixed(1)},${y(p.loss).toFixed(1)}`).join(" ") }),
    svg("circle", { class: "chart-dot", cx: x(latest.step), cy: y(latest.loss), r: 4 }));
  return chart;
}

/** The loss card. */
export function lossCard() {
  const slot = h("div", { class: "chart-wrap" });
  const el = h("section", { class: "card", "aria-labelledby": "chart-title" }, h("h2", { id: "chart-title" }, "Loss"), slot);
  let points = [];
  let queued = false;

  function draw() {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      slot.replaceChildren(lossChart(points));
    });
  }

  draw();
  return {
    el,
    onEvent(ev) {
      const d = ev.data || {};
      if (ev.type !== "progress" || typeof d.loss !== "number" || !Number.isFinite(d.loss)) return;
      points = points.filter((p) => p.step < d.step); // a resumed attempt rewrites later steps
      points.push({ step: d.step, loss: d.loss });
      draw();
    },
    onEnd: draw,
  };
}
