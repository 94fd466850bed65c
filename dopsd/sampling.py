"""Sample images during and after training: base beside student for fixed prompts and seeds, the teacher's
zero-shot context per training image, and one contact sheet a person can look at."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from dopsd.lora import STUDENT_ADAPTER, active_adapter
from dopsd.models.base import Cond, ModelFamily


_LABEL_H = 14


def contact_sheet(rows: Sequence[tuple[str, Sequence[Image.Image]]], *, title: str) -> Image.Image:
    """A grid with one labelled row per entry of `rows` (label, images); images keep their size."""
    cell_w = max(im.width for _, ims in rows for im in ims)
    cell_h = max(im.height for _, ims in rows for im in ims)
    cols = max(len(ims) for _, ims in rows)
    sheet = Image.new("RGB", (max(cols * cell_w, 160), _LABEL_H + len(rows) * (cell_h + _LABEL_H)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 1), title, fill="black")
    y = _LABEL_H
    for label, images in rows:
        draw.text((2, y + 1), label[:120], fill="black")
        for i, im in enumerate(images):
            sheet.paste(im, (i * cell_w, y + _LABEL_H))
        y += cell_h + _LABEL_H
    return sheet


class SampleRenderer:
    """Renders the fixed sample set of a run; base-model images are rendered once and reused."""

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

    def _generate(self, conds: Sequence[Cond], adapter: str | None, seeds: Sequence[int]) -> list[Image.Image]:
        with active_adapter(self.family.transformer, adapter):
            width, height = self.size
            return self.family.generate(conds, seeds=seeds, width=width, height=height, num_steps=self.num_steps)

    def student_images(self) -> list[Image.Image]:
        """The current student's images, prompt-major then seed."""
        return self._generate(self.prompt_conds, STUDENT_ADAPTER, self.seeds)

    def render(self, out_dir: Path, step: int) -> list[Path]:
        """Writes base/student PNGs per prompt and seed, the teacher-context PNGs and `contact_sheet.png`."""
        out_dir.mkdir(parents=True, exist_ok=True)
        if self._base is None:
            self._base = self._generate(self.prompt_conds, None, self.seeds)
            # Zero-shot teacher context on the base model: if it cannot show the concept, training cannot either.
            self._teacher = self._generate([c for _, c in self.teacher_samples], None, self.seeds[:1])
        student = self.student_images()
        paths: list[Path] = []
        rows: list[tuple[str, list[Image.Image]]] = []
        n = len(self.seeds)
        for i, prompt in enumerate(self.prompts):
            base_row, student_row = self._base[i * n : (i + 1) * n], student[i * n : (i + 1) * n]
            for seed, base_im, student_im in zip(self.seeds, base_row, student_row, strict=True):
                for kind, im in (("base", base_im), ("student", student_im)):
                    path = out_dir / f"prompt-{i:02d}-seed-{seed}-{kind}.png"
                    im.save(path)
                    paths.append(path)
            rows.append((f"{prompt} | base x{n} | student x{n}", [*base_row, *student_row]))
        assert self._teacher is not None
        for (name, _), im in zip(self.teacher_samples, self._teacher, strict=True):
            path = out_dir / f"teacher-{Path(name).stem}.png"
            im.save(path)
            paths.append(path)
        rows.append(("teacher context, zero-shot (one per training image)", self._teacher))
        sheet_path = out_dir / "contact_sheet.png"
        contact_sheet(rows, title=f"step {step}").save(sheet_path)
        paths.append(sheet_path)
        return paths
