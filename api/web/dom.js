// DOM helpers for every view: element builders (h for HTML, svg for the loss chart), the page's <main>, the toast,
// the small pieces several views show (an error sentence, a status badge) and moving focus to a new view's heading.

import { statusLabel } from "./format.js";

/** The element every view renders into. */
export const main = document.getElementById("main");

/**
 * An HTML element: `attrs` are attributes (`class`, `text`, `dataset`, `on<event>` listeners, DOM properties for
 * non-string values), `children` nodes or text (arrays are flattened; null, undefined and false are left out).
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  appendAll(el, children);
  return el;
}

/** An SVG element, with the same arguments as `h`. */
export function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  setAttrs(el, attrs);
  appendAll(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.setAttribute("class", v);
    else if (k === "text") el.textContent = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k in el && typeof v !== "string" && !(el instanceof SVGElement)) el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
}

function appendAll(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

let toastTimer = null;

/** Shows `message` at the bottom of the screen for a few seconds (announced by screen readers). */
export function toast(message) {
  const el = document.getElementById("toast");
  el.textContent = message;
  el.classList.add("show");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => el.classList.remove("show"), 4000);
}

/** An error sentence, announced as an alert. */
export function errorBox(message) {
  return h("p", { class: "error", role: "alert" }, message);
}

/** A job's status as a coloured badge (its `data-status` is the API's status). */
export function badge(status) {
  return h("span", { class: `badge badge-${status}`, dataset: { status } }, statusLabel(status));
}

/** Moves keyboard focus to the view's heading, so a screen reader announces the new view. */
export function focusHeading() {
  const h1 = main.querySelector("h1");
  if (h1) {
    h1.tabIndex = -1;
    h1.focus({ preventScroll: true });
  }
}

/** Starts a download of `url` under the file name `name`. */
export function download(url, name) {
  const a = h("a", { href: url, download: name, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
}
