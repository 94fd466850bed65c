"""Sample images during and after training, and zero-shot previews of a concept.

During training: the validation prompts at the model's native few-step setting with fixed seeds, the base model
(rendered once) beside the adapter at each sampled step, the teacher's zero-shot context per training image, and
one contact sheet that grows by a row per sampled step (base row first), so a person sees the run converge.
Before training: `render_previews` shows what the base model makes of (reference image + prompt) through the
teacher's multimodal context; if it cannot show the concept, training cannot teach it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw

from dopsd.lora import STUDENT_ADAPTER, active_adapter
from dopsd.models.base import Cond, ModelFamily


_LABEL_H = 14
SampleKind = Literal["base", "adapter", "teacher", "preview"]


@dataclass(frozen=True)
class SampleImage:
    """One written sample: where it is and what it shows."""

    path: Path
    kind: SampleKind
    prompt: str
    seed: int
    source: str | None = None  # the training/reference image whose features condition it (teacher, preview)


@dataclass(frozen=True)
class SampleSet:
    """The samples of one sampled step (or of a preview), with the contact sheet that shows them."""

    step: int
    final: bool
    images: list[SampleImage]
    contact_sheet: Path
    folder: Path


def contact_sheet(rows: Sequence[tuple[str, Sequence[Image.Image]]], *, title: str) -> Image.Image:
    """A grid with one labelled row per entry of `rows` (label, images); images keep their size."""
    cell_w = max(im.width for _, ims in rows for im in ims)
    cell_h = max(im.height for _, ims in rows for im in ims)
    cols = max(len(ims) for _, ims in rows)
    sheet = Image.new(
        "RGB", (max(cols * cell_w, 6 * len(title[:160]), 160), _LABEL_H + len(rows) * (cell_h + _LABEL_H)), "white"
    )
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 1), title[:160], fill="black")
    y = _LABEL_H
    for label, images in rows:
        draw.text((2, y + 1), label[:120], fill="black")
        for i, im in enumerate(images):
            sheet.paste(im, (i * cell_w, y + _LABEL_H))
        y += cell_h + _LABEL_H
    return sheet


class SampleRenderer:
    """Renders the fixed sample set of a run; the base model's and the teacher's images are rendered once."""

    def __init__(
        self,
        family: ModelFamily,
        *,
        prompts: Sequence[str],
        prompt_conds: Sequence[Cond],
        teacher_samples: Sequence[tuple[str, Cond]],
        seeds: Sequence[int],
        width: int,
        height: int,
        num_steps: int,
    ) -> None:
        self.family = family
        self.prompts = list(prompts)
        self.prompt_conds = list(prompt_conds)
        self.teacher_samples = list(teacher_samples)
        self.seeds = list(seeds)
        self.size = (width, height)
        self.num_steps = num_steps
        self._base: list[Image.Image] | None = None
        self._teacher: list[Image.Image] | None = None
        self._adapter_rows: list[tuple[int, list[Image.Image]]] = []

    def _generate(self, conds: Sequence[Cond], adapter: str | None, seeds: Sequence[int]) -> list[Image.Image]:
        with active_adapter(self.family.transformer, adapter):
            width, height = self.size
            return self.family.generate(conds, seeds=seeds, width=width, height=height, num_steps=self.num_steps)

    def student_images(self) -> list[Image.Image]:
        """The current adapter's images, prompt-major then seed."""
        return self._generate(self.prompt_conds, STUDENT_ADAPTER, self.seeds)

    def render(self, out_dir: Path, step: int, *, final: bool = False) -> SampleSet:
        """Writes base and adapter PNGs per prompt and seed, the teacher-context PNGs, and `contact_sheet.png`:
        the base row, then one adapter row per step sampled so far, then the teacher row."""
        out_dir.mkdir(parents=True, exist_ok=True)
        if self._base is None:
            self._base = self._generate(self.prompt_conds, None, self.seeds)
            self._teacher = self._generate([c for _, c in self.teacher_samples], None, self.seeds[:1])
        adapter = self.student_images()
        self._adapter_rows.append((step, adapter))
        images: list[SampleImage] = []
        pairs = [(prompt, seed) for prompt in self.prompts for seed in self.seeds]
        for (prompt, seed), base_im, adapter_im, i in zip(pairs, self._base, adapter, range(len(pairs)), strict=True):
            stem = f"prompt-{i // len(self.seeds):02d}-seed-{seed}"
            base_path, adapter_path = out_dir / f"{stem}-base.png", out_dir / f"{stem}-adapter.png"
            base_im.save(base_path)
            adapter_im.save(adapter_path)
            images += [
                SampleImage(base_path, "base", prompt, seed),
                SampleImage(adapter_path, "adapter", prompt, seed),
            ]
        assert self._teacher is not None
        for (name, _), im in zip(self.teacher_samples, self._teacher, strict=True):
            path = out_dir / f"teacher-{Path(name).stem}.png"
            im.save(path)
            images.append(SampleImage(path, "teacher", "", self.seeds[0], source=name))
        legend = " | ".join(f"{p[:40]} (seed {s})" for p, s in pairs)
        rows: list[tuple[str, Sequence[Image.Image]]] = [("base model", self._base)]
        rows += [(f"adapter, step {s}", ims) for s, ims in self._adapter_rows]
        rows.append(("teacher context, zero-shot (one per training image)", self._teacher))
        sheet_path = out_dir / "contact_sheet.png"
        contact_sheet(rows, title=f"step {step}: {legend}").save(sheet_path)
        return SampleSet(step=step, final=final, images=images, contact_sheet=sheet_path, folder=out_dir)


def render_previews(
    family: ModelFamily,
    *,
    references: Sequence[tuple[str, Image.Image]],
    prompts: Sequence[str],
    seed: int,
    width: int,
    height: int,
    num_steps: int,
    encode_teacher: Callable[[Image.Image, str], Cond],
    out_dir: Path,
) -> SampleSet:
    """Zero-shot previews: for each reference image and prompt, the base model (no adapter) conditioned on the
    teacher context of (image + prompt), at the native few-step setting; written as PNGs with a contact sheet
    (one row per reference image, one column per prompt)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images: list[SampleImage] = []
    rows: list[tuple[str, Sequence[Image.Image]]] = []
    for r, (name, reference) in enumerate(references):
        conds = [encode_teacher(reference, prompt) for prompt in prompts]
        # A worker's cached model carries no adapters between jobs; if one does, switch them off.
        has_adapters = bool(getattr(family.transformer, "peft_config", None))
        with active_adapter(family.transformer, None) if has_adapters else contextlib.nullcontext():
            rendered = family.generate(conds, seeds=[seed], width=width, height=height, num_steps=num_steps)
        for p, (prompt, im) in enumerate(zip(prompts, rendered, strict=True)):
            path = out_dir / f"preview-{r:02d}-prompt-{p:02d}.png"
            im.save(path)
            images.append(SampleImage(path, "preview", prompt, seed, source=name))
        rows.append((name, rendered))
    sheet_path = out_dir / "contact_sheet.png"
    legend = " | ".join(p[:40] for p in prompts)
    contact_sheet(rows, title=f"zero-shot teacher context: {legend}").save(sheet_path)
    return SampleSet(step=0, final=True, images=images, contact_sheet=sheet_path, folder=out_dir)
