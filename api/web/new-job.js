// The new-job view (#/new): the form's layout and fields (concept, model, steps, samples, formats), the presets
// loaded into it, and the two ways out: a zero-shot preview or the training job itself. The field bounds and
// defaults are the API's (service-info.js); images, estimate and preview have modules of their own.

import { api, ApiError } from "./api.js";
import { errorBox, focusHeading, h, main, toast } from "./dom.js";
import { describeError } from "./format.js";
import { buildSpec, draft, formData, PAGE_PROMPT, startDraft, usableFiles } from "./new-job-draft.js";
import { estimateBox } from "./new-job-estimate.js";
import { imagesSection } from "./new-job-files.js";
import { previewBox } from "./new-job-preview.js";
import { loadedPresets, loadPresets, loadSpecFields } from "./service-info.js";

/** A number input bounded as the JobSpec bounds `field`. */
function numberInput(id, field, value) {
  return h("input", { id, type: "number", min: field.minimum, max: field.maximum, inputmode: "numeric", value });
}

function field(label, control, ...after) {
  return h("div", { class: "field" }, h("label", { for: control.id }, label), control, ...after);
}

/** "Continues job …" while the draft continues an earlier job's adapter, with a way back to the base model. */
function continuingNote(onBaseModel) {
  if (!draft.initAdapter) return null;
  const note = h("div", { class: "continuing", id: "continuing", dataset: { initAdapter: draft.initAdapter } },
    h("p", {}, "Continues the adapter of job ", h("a", { href: `#/jobs/${draft.initAdapter}` }, draft.initAdapter.slice(0, 8)),
      ": the new adapter starts from its weights, with its rank and alpha. Use the same trigger word for more steps ",
      "on its concept, or another one for a new concept on top; the report then says whether it kept the old one."),
    h("button", {
      type: "button", class: "link", id: "continue-clear",
      onclick: () => {
        note.remove();
        onBaseModel();
      },
    }, "Start from the base model instead"));
  return note;
}

export async function viewNew(signal) {
  let spec;
  try {
    spec = await loadSpecFields(signal);
  } catch {
    return; // the view was left
  }
  if (signal.aborted) return;
  startDraft(spec);

  const page = h("div", { class: "page" });
  main.replaceChildren(page);
  const title = h("h1", {}, draft.initAdapter ? "Continue training" : "Start a training job");
  page.append(title,
    h("p", { class: "lead" }, "Add a few pictures of one concept (an object, a pet, a style), say what it is called, ",
      "and train a small adapter that teaches the model your concept."));

  const form = h("form", { class: "new-job", novalidate: true, "aria-label": "New training job" });
  page.append(form);

  const estimate = estimateBox({ signal, onRefused: (e) => images.markRefusedFile(e) });
  const images = imagesSection({
    signal, onChange: () => estimate.schedule(), captionMaxLength: spec.field("default_caption").maxLength,
  });

  // Concept
  const trigger = h("input", {
    id: "trigger", value: draft.trigger, maxlength: spec.field("trigger").maxLength, required: true, autocomplete: "off",
    "aria-describedby": "trigger-hint",
  });
  const defaultCaption = h("input", { id: "default-caption", value: draft.defaultCaption, maxlength: spec.field("default_caption").maxLength });
  const conceptSection = h("fieldset", { class: "card" }, h("legend", {}, "2. Concept"),
    field("Trigger word", trigger,
      h("p", { class: "hint", id: "trigger-hint" }, "A rare word that will mean your concept, such as “sks”.")),
    field("Default caption", defaultCaption,
      h("p", { class: "hint" }, h("code", {}, "[V]"), " is replaced by the trigger word. ",
        "Each image can have its own caption instead (next to its thumbnail).")),
  );

  // Training
  const presetSelect = h("select", { id: "preset", "aria-describedby": "preset-hint" });
  const presetHint = h("p", { class: "hint", id: "preset-hint" });
  const steps = numberInput("steps", spec.field("steps"), draft.steps);
  const sampleEvery = numberInput("sample-every", spec.field("sample_every"), draft.sampleEvery);
  sampleEvery.setAttribute("aria-describedby", "sample-hint");
  const seeds = h("input", {
    id: "seeds", value: draft.seeds, inputmode: "numeric", autocomplete: "off", "aria-describedby": "sample-hint",
  });
  const prompts = h("textarea", { id: "prompts", rows: 3 });
  prompts.value = draft.prompts;
  const formatBoxes = ["diffusers", "comfyui"].map((name) => {
    const box = h("input", { type: "checkbox", id: `format-${name}`, checked: draft.formats[name] });
    box.addEventListener("change", () => {
      draft.formats[name] = box.checked;
      if (!draft.formats.diffusers && !draft.formats.comfyui) { // one format at least
        draft.formats[name] = true;
        box.checked = true;
      }
      estimate.schedule();
    });
    return h("label", { class: "check" }, box, name === "diffusers" ? " diffusers" : " ComfyUI");
  });
  const continuing = continuingNote(() => {
    draft.initAdapter = null;
    title.textContent = "Start a training job";
    presetSelect.disabled = false;
    estimate.schedule();
  });
  presetSelect.disabled = Boolean(draft.initAdapter); // a continued job keeps its adapter's model
  const trainingSection = h("fieldset", { class: "card" }, h("legend", {}, "3. Training"),
    continuing,
    field("Model", presetSelect, presetHint),
    h("div", { class: "row" }, field("Steps", steps), field("Sample every", sampleEvery), field("Sample seeds", seeds)),
    h("p", { class: "hint", id: "sample-hint" }, "Sample every: the number of steps between sample images (0: only at ",
      "the end). Seeds: one or more numbers, separated by commas."),
    field("Validation prompts (one per line)", prompts,
      h("p", { class: "hint" }, "Samples of these prompts show how the concept is learned; use ", h("code", {}, "[V]"), ".")),
    h("fieldset", { class: "inline" }, h("legend", {}, "Adapter formats"), formatBoxes),
  );

  // Check and start
  const preview = previewBox({ signal });
  const previewButton = h("button", { type: "button", id: "preview-button", class: "secondary" }, "Preview the concept first");
  const submitButton = h("button", { type: "submit", id: "submit-button", class: "primary" }, "Start training");
  const submitError = h("div", { id: "submit-error" });
  const summarySection = h("section", { class: "card summary", "aria-label": "Estimate and start" },
    h("h2", {}, "4. Check and start"), estimate.el,
    h("div", { class: "actions" }, previewButton, submitButton), submitError, preview.el);

  form.append(images.el, h("div", { class: "settings" }, conceptSection, trainingSection, summarySection));

  // --- fields
  const bind = (el, key, then) => el.addEventListener("input", () => {
    draft[key] = el.value;
    then?.();
    estimate.schedule();
  });
  bind(trigger, "trigger");
  bind(defaultCaption, "defaultCaption", () => images.showDefaultCaption());
  bind(steps, "steps");
  bind(sampleEvery, "sampleEvery");
  bind(seeds, "seeds");
  bind(prompts, "prompts");

  // --- the model: its description, and its defaults as the placeholders of steps and sample interval
  function showPresetHint() {
    const p = loadedPresets().find((x) => x.name === draft.preset);
    if (!p) return;
    presetHint.textContent = `${p.description}. Images need a short side of at least ${p.min_image_side} px.`;
    steps.placeholder = p.defaults?.max_train_steps ? `${p.defaults.max_train_steps} (default)` : "";
    sampleEvery.placeholder = p.defaults?.sample_every !== undefined ? `${p.defaults.sample_every} (default)` : "";
  }

  // --- the model's own starting points: a closed-vocabulary model (`shapes`) has its own trigger word, no default
  // caption and its own prompts. A field the person edited keeps their text; one still at the previous model's
  // starting point follows the new model.
  const startingPoints = (p) => ({
    trigger: p?.defaults?.trigger ?? draft.specDefaults.trigger,
    defaultCaption: p?.defaults && "default_caption" in p.defaults
      ? (p.defaults.default_caption ?? "") : draft.specDefaults.defaultCaption,
    prompts: p?.defaults?.validation_prompts?.[0] ?? PAGE_PROMPT,
  });
  const controls = { trigger, defaultCaption, prompts };
  function followPreset(previous, next) {
    const [before, after] = [startingPoints(previous), startingPoints(next)];
    for (const key of Object.keys(controls)) {
      if (draft[key] === before[key] && !draft.initAdapter) draft[key] = controls[key].value = after[key];
    }
    images.showDefaultCaption();
    images.offerExamples(next?.example_images);
  }
  const presetNamed = (name) => loadedPresets().find((x) => x.name === name);

  presetSelect.addEventListener("change", () => {
    const previous = presetNamed(draft.preset);
    draft.preset = presetSelect.value;
    followPreset(previous, presetNamed(draft.preset));
    showPresetHint();
    images.recheck();
    estimate.schedule();
  });

  loadPresets(signal).then((presets) => {
    presetSelect.replaceChildren(...presets.map((p) => h("option", { value: p.name }, `${p.name} (${p.device})`)));
    if (!draft.preset || !presets.some((p) => p.name === draft.preset)) {
      // A first job on the model the project pretrained (it learns a visible concept on a CPU), else a tiny one.
      const first = presets.find((p) => p.example_images?.length) || presets.find((p) => p.name.startsWith("tiny"));
      draft.preset = (first || presets[0]).name;
      followPreset(null, presetNamed(draft.preset));
    } else {
      images.offerExamples(presetNamed(draft.preset)?.example_images);
    }
    presetSelect.value = draft.preset;
    showPresetHint();
    images.recheck(true);
    estimate.schedule();
  }).catch((e) => {
    if (!signal.aborted) presetHint.replaceWith(errorBox(`The models could not be loaded. ${describeError(e)}`));
  });

  // --- preview and submit
  function filesOrError() {
    submitError.replaceChildren();
    const files = usableFiles();
    if (!files.length) submitError.replaceChildren(errorBox("Add at least one image that was not refused."));
    return files;
  }

  previewButton.addEventListener("click", async () => {
    const files = filesOrError();
    if (!files.length) return;
    previewButton.disabled = true;
    try {
      await preview.start(files, buildSpec());
    } catch (e) {
      if (!signal.aborted) submitError.replaceChildren(errorBox(describeError(e)));
    } finally {
      previewButton.disabled = false;
    }
  });

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const files = filesOrError();
    if (!files.length) return;
    if (draft.files.some((f) => f.status === "checking")) {
      submitError.replaceChildren(errorBox("Some images are still being checked; try again in a moment."));
      return;
    }
    submitButton.disabled = true;
    submitButton.textContent = "Starting…";
    try {
      const job = await api("/v1/jobs", {
        method: "POST", body: formData(files, buildSpec()), signal,
        headers: { "Idempotency-Key": draft.idempotencyKey || (draft.idempotencyKey = crypto.randomUUID()) },
      });
      for (const f of draft.files) URL.revokeObjectURL(f.url);
      draft.files = [];
      draft.preview = null;
      draft.idempotencyKey = null;
      draft.initAdapter = null;
      toast("The job was submitted.");
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof ApiError && e.status === 409) draft.idempotencyKey = null;
      submitError.replaceChildren(errorBox(describeError(e)));
      images.markRefusedFile(e);
    } finally {
      submitButton.disabled = false;
      submitButton.textContent = "Start training";
    }
  });
  // Any change to the request makes it a new one (a new idempotency key at the next submission).
  form.addEventListener("input", () => { draft.idempotencyKey = null; });
  form.addEventListener("change", () => { draft.idempotencyKey = null; });

  focusHeading();
}
