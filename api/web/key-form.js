// The key form, shown while the tab has no API key: the key is tried on GET /v1/presets before it is kept (in this
// tab's sessionStorage only), and a refused one says so in a sentence.

import { api, clearKey, setKey } from "./api.js";
import { h, main } from "./dom.js";
import { describeError } from "./format.js";

/** Shows the key form, with `message` (why it is shown) above its button; `onSignedIn()` once a key works. */
export function viewKey(message, onSignedIn) {
  const input = h("input", {
    id: "api-key", name: "api-key", type: "password", autocomplete: "off", spellcheck: "false", required: true,
  });
  const error = h("p", { class: "error", role: "alert" }, message || "");
  const button = h("button", { type: "submit", class: "primary" }, "Use this key");
  const form = h("form", { class: "card narrow", "aria-labelledby": "key-title" },
    h("h1", { id: "key-title" }, "Enter your API key"),
    h("p", {}, "The key stays in this browser tab only (session storage) and is sent to this service as an ",
      h("code", {}, "Authorization"), " header, never in a link."),
    h("div", { class: "field" }, h("label", { for: "api-key" }, "API key"), input),
    error,
    h("div", { class: "actions" }, button),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    button.disabled = true;
    error.textContent = "";
    setKey(key);
    try {
      await api("/v1/presets", { quiet401: true });
    } catch (e) {
      clearKey();
      button.disabled = false;
      error.textContent = describeError(e);
      input.focus();
      return;
    }
    onSignedIn();
  });
  main.replaceChildren(form);
  input.focus();
}
