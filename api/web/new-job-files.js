// The new-job form's first card: reference images dropped or chosen, shown at once as thumbnails, each checked
// with a dry run as it arrives (a refused file shows the API's reason and is left out), each with its own caption.

import { ApiError } from "./api.js";
import { h, toast } from "./dom.js";
import { describeError, formatBytes, sentence } from "./format.js";
import { draft, dryRun, usableFiles } from "./new-job-draft.js";

const IMAGE_TYPES = "image/png,image/jpeg,image/webp";
let nextUid = 1;

/**
 * The images card. `onChange()` is called whenever the set of usable files or a caption changes (the estimate
 * follows); `captionMaxLength` bounds a caption. Returns the card and what the rest of the form asks of it.
 */
export function imagesSection({ signal, onChange, captionMaxLength }) {
  const fileInput = h("input", {
    id: "images", type: "file", multiple: true, accept: IMAGE_TYPES, class: "visually-hidden", tabindex: "-1",
    "aria-label": "Reference images",
  });
  const chooseButton = h("button", { type: "button", class: "secondary", id: "choose-images" }, "Choose images…");
  chooseButton.addEventListener("click", () => fileInput.click());
  const dropzone = h("div", { class: "dropzone", id: "dropzone" },
    h("span", { class: "dropzone-title" }, "Drop reference images here"),
    chooseButton,
    h("span", { class: "muted small" }, "PNG, JPEG or WebP · 1 to 64 images of one concept"),
  );
  dropzone.addEventListener("click", (ev) => {
    if (ev.target === dropzone) fileInput.click(); // a click anywhere on the zone, as on its button
  });
  // The chosen model's bundled example images (the `shapes` model's never-seen cross), for a first job.
  const examplesButton = h("button", { type: "button", class: "secondary", id: "use-examples", hidden: true },
    "Use the example images");
  examplesButton.addEventListener("click", async () => {
    examplesButton.disabled = true;
    try {
      const files = await Promise.all(examplesButton.urls.map(async (url) => {
        const response = await fetch(url, { signal });
        if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
        return new File([await response.blob()], url.split("/").pop(), { type: "image/png" });
      }));
      addFiles(files);
    } catch (e) {
      if (!signal.aborted) toast(`The example images could not be loaded. ${describeError(e)}`);
    } finally {
      examplesButton.disabled = false;
    }
  });
  dropzone.append(examplesButton);
  const fileList = h("ul", { class: "files", id: "file-list", "aria-label": "Reference images" });
  const fileNote = h("p", { class: "muted small", id: "file-note", "aria-live": "polite" });
  const el = h("fieldset", { class: "card images" },
    h("legend", {}, "1. Reference images"), fileInput, dropzone, fileNote, fileList);

  function setNote() {
    const refused = draft.files.filter((f) => f.status === "refused").length;
    const checking = draft.files.filter((f) => f.status === "checking").length;
    const parts = [];
    if (checking) parts.push(`Checking ${checking} ${checking === 1 ? "image" : "images"}…`);
    else if (draft.files.length) parts.push(`${usableFiles().length} of ${draft.files.length} images will be used.`);
    if (refused) parts.push(`${refused} refused ${refused === 1 ? "file is" : "files are"} left out.`);
    if (draft.dryRunUnsupported) parts.push("This service checks images when the job is submitted.");
    fileNote.textContent = parts.join(" ");
  }

  function renderFile(f) {
    const status = {
      checking: h("span", { class: "file-status checking" }, "Checking…"),
      ok: h("span", { class: "file-status ok" }, "Accepted"),
      unchecked: h("span", { class: "file-status" }, f.reason ? f.reason : "Not checked yet"),
      refused: h("span", { class: "file-status refused", role: "alert" }, `Refused: ${f.reason}`),
    }[f.status];
    const thumb = h("img", { class: "thumb", src: f.url, alt: "", width: 72, height: 72 });
    thumb.addEventListener("error", () => thumb.replaceWith(h("span", { class: "thumb thumb-broken", "aria-hidden": "true" }, "?")));
    const captionId = `caption-${f.uid}`;
    const caption = h("input", {
      id: captionId, value: f.caption, placeholder: draft.defaultCaption, maxlength: captionMaxLength,
      disabled: f.status === "refused",
    });
    caption.addEventListener("input", () => {
      f.caption = caption.value;
      onChange();
    });
    const remove = h("button", { type: "button", class: "link", "aria-label": `Remove ${f.name}` }, "Remove");
    remove.addEventListener("click", () => {
      URL.revokeObjectURL(f.url);
      draft.files = draft.files.filter((x) => x !== f);
      li.remove();
      setNote();
      onChange();
    });
    const li = h("li", { class: `file file-${f.status}`, dataset: { name: f.name, status: f.status } },
      thumb,
      h("div", { class: "file-body" },
        h("div", { class: "file-head" }, h("span", { class: "file-name" }, f.name),
          h("span", { class: "muted small" }, formatBytes(f.size)), status),
        h("label", { for: captionId, class: "small" }, `Caption for ${f.name} (optional)`), caption),
      remove);
    f.li?.replaceWith(li);
    f.li = li;
    return li;
  }

  function updateFile(f) {
    if (f.li && f.li.isConnected) renderFile(f);
    setNote();
  }

  /** Marks the file an API error names (an image error's `details.file`) as refused, with the API's reason. */
  function markRefusedFile(e) {
    if (!(e instanceof ApiError && e.details && e.details.file)) return;
    const f = draft.files.find((x) => x.name === e.details.file);
    if (!f) return;
    f.status = "refused";
    f.reason = sentence(e.details.reason);
    updateFile(f);
  }

  // One dry run at a time, in the order the files came.
  let checkQueue = Promise.resolve();
  function check(f) {
    f.status = draft.dryRunUnsupported ? "unchecked" : "checking";
    updateFile(f);
    if (draft.dryRunUnsupported || !draft.preset) return; // checked once the models are loaded
    checkQueue = checkQueue.then(async () => {
      if (!draft.files.includes(f)) return;
      try {
        const result = await dryRun([f], { preset: draft.preset });
        f.status = result ? "ok" : "unchecked";
        f.reason = "";
      } catch (e) {
        if (e instanceof ApiError && e.details && e.details.file) {
          f.status = "refused";
          f.reason = sentence(e.details.reason || e.apiMessage);
        } else if (e instanceof ApiError && e.status === 413) {
          f.status = "refused";
          f.reason = describeError(e);
        } else {
          f.status = "unchecked";
          f.reason = `Not checked: ${describeError(e)}`;
        }
      }
      updateFile(f);
      onChange();
    });
  }

  function addFiles(list) {
    for (const file of list) {
      const name = file.name || "image";
      if (draft.files.some((f) => f.name === name)) {
        toast(`${name} is already in the list.`);
        continue;
      }
      const f = { uid: nextUid++, file, name, size: file.size, url: URL.createObjectURL(file), status: "checking", reason: "", caption: "" };
      draft.files.push(f);
      fileList.append(renderFile(f));
      check(f);
    }
    setNote();
    onChange();
  }

  fileInput.addEventListener("change", () => {
    addFiles([...fileInput.files]);
    fileInput.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    dropzone.addEventListener(type, (ev) => {
      ev.preventDefault();
      dropzone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "dragend"]) dropzone.addEventListener(type, () => dropzone.classList.remove("dragging"));
  dropzone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    dropzone.classList.remove("dragging");
    addFiles([...(ev.dataTransfer?.files || [])]);
  });
  // A file dropped next to the zone should not open in the tab and lose the form.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (ev) => ev.preventDefault(), { signal });

  for (const f of draft.files) fileList.append(renderFile(f));
  setNote();

  return {
    el,
    /** Checks every file again (another model was chosen), or only those still waiting for the models. */
    recheck(onlyWaiting = false) {
      for (const f of draft.files) if (!onlyWaiting || f.status === "checking") check(f);
    },
    markRefusedFile,
    /** Offers the chosen model's example images (URLs on this service), or hides the offer when it has none. */
    offerExamples(urls) {
      examplesButton.urls = urls || [];
      examplesButton.hidden = !examplesButton.urls.length;
    },
    /** Shows the default caption in every caption box left empty. */
    showDefaultCaption() {
      for (const f of draft.files) if (f.li) f.li.querySelector("input").placeholder = draft.defaultCaption;
    },
  };
}
