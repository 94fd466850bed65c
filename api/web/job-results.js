// The job view's results card, once a training job has finished: the teacher–student gap before and after, the
// final loss and GPU time (and the job it continued, if any), downloads of the adapter for diffusers or ComfyUI (a
// fresh short-lived link at each click), "Continue training" (the new-job form, starting from this adapter) and a
// diffusers snippet with a copy button.

import { api } from "./api.js";
import { download, errorBox, h } from "./dom.js";
import { describeError, formatBytes, formatDuration, formatLoss } from "./format.js";
import { continueFrom } from "./new-job-draft.js";
import { loadPresets } from "./service-info.js";

const DEFAULT_ADAPTER_FILE = "pytorch_lora_weights.safetensors";

/** Python that loads the base model and the adapter and makes one image of the first validation prompt. */
function diffusersSnippet(job, preset, adapterName) {
  const c = job.config || {};
  const base = c.pretrained_model_name_or_path || "<base model>";
  const trigger = c.trigger || "sks";
  const prompt = (c.validation_prompts?.[0] || "a photo of [V]").replaceAll("[V]", trigger).replaceAll('"', '\\"');
  const lines = ["import torch", "from diffusers import DiffusionPipeline", ""];
  if (base.startsWith("tiny://")) lines.push("# a tiny test preset: use the real base model of the family here");
  lines.push(
    `pipe = DiffusionPipeline.from_pretrained("${base}", torch_dtype=torch.bfloat16).to("cuda")`,
    `pipe.load_lora_weights("${adapterName}")  # the adapter downloaded above`,
    `image = pipe("${prompt}", num_inference_steps=${c.sample_steps || 8}${preset?.family === "z_image" ? ", guidance_scale=0.0" : ""}).images[0]`,
    `image.save("${trigger}.png")`,
  );
  return lines.join("\n");
}

/** The adapter file of `format` ("diffusers" or "comfyui") among a job's artifacts. */
function findAdapter(artifacts, format) {
  const adapters = artifacts.filter((a) => a.kind.startsWith("adapter") || (a.name.endsWith(".safetensors") && !a.name.includes("/")));
  const comfy = (a) => /comfy/i.test(a.kind) || /comfy/i.test(a.name);
  return format === "comfyui" ? adapters.find(comfy) : adapters.find((a) => !comfy(a));
}

const baseName = (artifact) => artifact.name.split("/").pop();

function facts(metrics, job) {
  const m = metrics || {};
  const items = [];
  if (typeof m.gap_before === "number" && typeof m.gap_after === "number") {
    const change = m.gap_before ? Math.round((100 * (m.gap_after - m.gap_before)) / m.gap_before) : 0;
    items.push(h("div", {}, h("dt", {}, "Teacher–student gap"),
      h("dd", {}, `${formatLoss(m.gap_before)} → ${formatLoss(m.gap_after)} (${change > 0 ? "+" : ""}${change}%)`)));
  }
  if (typeof m.final_loss === "number") items.push(h("div", {}, h("dt", {}, "Final loss"), h("dd", {}, formatLoss(m.final_loss))));
  const gpu = m.gpu_seconds ?? job.gpu_seconds;
  if (typeof gpu === "number") items.push(h("div", {}, h("dt", {}, "GPU time"), h("dd", {}, formatDuration(gpu))));
  const earlier = job.config?.init_adapter;
  if (earlier) {
    items.push(h("div", { id: "continued-from" }, h("dt", {}, "Continued from"),
      h("dd", {}, h("a", { href: `#/jobs/${earlier}` }, `job ${String(earlier).slice(0, 8)}`))));
  }
  return items.length ? h("dl", { class: "facts" }, items) : null;
}

/** "Continue training": the new-job form with this job's adapter, preset and trigger word filled in. */
function continueButton(job) {
  return h("button", {
    type: "button", class: "secondary", id: "continue-training",
    onclick: () => {
      continueFrom(job);
      location.hash = "#/new";
    },
  }, "Continue training");
}

/** The results card (hidden until a training job has succeeded). */
export function resultsCard(ctx) {
  const { signal } = ctx;
  const el = h("section", { class: "card results", id: "results", hidden: true, "aria-labelledby": "results-title" });
  let metrics = null; // the `succeeded` event's data

  function downloadButton(format, label, artifact, note) {
    const b = h("button", { type: "button", class: format === "diffusers" ? "primary" : "secondary", id: `download-${format}` },
      `${label} (${formatBytes(artifact.size)})`);
    b.addEventListener("click", async () => {
      note.textContent = "";
      try {
        // Links expire: ask for a fresh one at each click.
        const fresh = findAdapter((await api(`/v1/jobs/${ctx.job.id}/artifacts`, { signal })).data, format);
        download(fresh.url, baseName(fresh));
      } catch (e) {
        if (!signal.aborted) note.replaceChildren(errorBox(describeError(e)));
      }
    });
    return b;
  }

  async function draw() {
    const job = ctx.job;
    if (job.status !== "succeeded" || job.kind === "preview") {
      el.hidden = true;
      return;
    }
    el.hidden = false;
    const formats = h("div", { class: "actions", id: "downloads" });
    const note = h("p", { class: "small", "aria-live": "polite" });
    const code = h("code", { id: "snippet" });
    const copy = h("button", { type: "button", class: "secondary", id: "copy-snippet" }, "Copy code");
    const copied = h("span", { class: "small muted", "aria-live": "polite" });
    el.replaceChildren(
      h("h2", { id: "results-title" }, "Your adapter"),
      facts(metrics, job),
      formats, note,
      h("h3", {}, "Use it in diffusers"),
      h("pre", { class: "snippet" }, code),
      h("div", { class: "actions" }, copy, copied),
    );
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(code.textContent);
        copied.textContent = "Copied.";
      } catch {
        getSelection().selectAllChildren(code);
        copied.textContent = "Selected: press Ctrl+C (⌘C) to copy.";
      }
    });
    code.textContent = diffusersSnippet(job, null, DEFAULT_ADAPTER_FILE);
    try {
      const [artifacts, presets] = await Promise.all([ctx.artifacts(), loadPresets(signal).catch(() => [])]);
      const preset = presets.find((p) => p.name === job.preset);
      const diffusersFile = findAdapter(artifacts, "diffusers");
      code.textContent = diffusersSnippet(job, preset, diffusersFile ? baseName(diffusersFile) : DEFAULT_ADAPTER_FILE);
      const buttons = [];
      for (const [format, label] of [["diffusers", "Download for diffusers"], ["comfyui", "Download for ComfyUI"]]) {
        const artifact = findAdapter(artifacts, format);
        if (artifact) buttons.push(downloadButton(format, label, artifact, note));
      }
      if (findAdapter(artifacts, "diffusers")) buttons.push(continueButton(job));
      formats.replaceChildren(...(buttons.length ? buttons : [h("p", { class: "muted" }, "No adapter file was stored.")]));
    } catch (e) {
      if (!signal.aborted) note.replaceChildren(errorBox(describeError(e)));
    }
  }

  return {
    el,
    onEvent(ev) {
      if (ev.type === "succeeded") metrics = ev.data || {};
    },
    onEnd: draw,
  };
}
