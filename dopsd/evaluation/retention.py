"""Retention: did a run that continued an earlier adapter keep what that adapter drew?

A run that starts from an earlier adapter (`init_adapter`, the output folder of the run that wrote it) has that
run's final samples: its validation prompts at its sample seeds, rendered at the model's native few-step setting.
Retention renders the same prompts again with the new adapter, at the same seeds and settings (the same pipeline
call: a CPU generator seeded per image), and with the base model (adapters off) as the baseline, then compares
both with the earlier samples, image by image:

    retention_i = 1 - d(new_i, earlier_i) / d(base_i, earlier_i)

with `d` the pixel MSE (and, with an embedding model, the embedding distance 1 - cosine). 1: the new adapter draws
the earlier images exactly; 0: it is as far from them as the base model is (everything the earlier adapter added is
gone); below 0: further still. The verdict (`kept` / `partly` / `lost`) reads the pixel figure's bootstrap 95%
interval over the images against `RetentionThresholds` (docs/evaluation.md, "Retention", says how they were
measured). The section goes into the report (`report.json` under `retention`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dopsd.data import resolve_caption
from dopsd.evaluation.embedding import Embedder
from dopsd.evaluation.image_metrics import mse_per_sample
from dopsd.evaluation.latents import pixels_from_image
from dopsd.evaluation.render import adapter_scope
from dopsd.evaluation.report import Figure
from dopsd.evaluation.stats import bootstrap_mean_ci
from dopsd.lora import STUDENT_ADAPTER
from dopsd.models.base import Cond, ModelFamily


SCHEMA = "dopsd.retention/1"
# The names `dopsd.sampling.SampleRenderer` gives an adapter's sample: prompt index, seed.
_SAMPLE_NAME = re.compile(r"prompt-(?P<prompt>\d+)-seed-(?P<seed>\d+)-adapter\.png$")
_MAX_CASES = 16  # the earlier run's samples rendered again at most (its validation prompts x seeds)


@dataclass(frozen=True)
class RetentionThresholds:
    """Where the retention figure (1 = the earlier samples exactly, 0 = as far from them as the base model)
    turns from one verdict to the next: `kept` when its whole 95% interval is at or above `kept`, `lost` when the
    whole interval is at or below `lost`, `partly` otherwise. Measured on the tiny presets with
    `python bench/retention_calibration.py` (docs/evaluation.md)."""

    kept: float = 0.6
    lost: float = 0.2
    calibrated_on: str = "tiny-z-image, tiny-flux2-klein (random weights); re-measure on real weights"

    def to_dict(self) -> dict[str, float | str]:
        """The thresholds as a JSON-ready dict."""
        return dataclasses.asdict(self)


DEFAULT_RETENTION_THRESHOLDS = RetentionThresholds()


class RetentionUnavailable(Exception):
    """The earlier adapter came without what retention needs (its run's config and final samples); the reason
    is said in the report instead of a figure."""


@dataclass(frozen=True)
class RetentionReference:
    """An earlier run's final adapter samples: one image per (prompt, seed), and the setting they were made at."""

    source: str  # the earlier run's folder name (a service job's id)
    step: int | None  # the earlier run's step of those samples
    prompts: list[str]  # per case, the trigger in place
    seeds: list[int]  # per case
    images: list[Image.Image]  # per case
    width: int
    height: int
    num_steps: int


def load_reference(path: str | Path) -> RetentionReference:
    """The final samples of the run whose output folder holds the adapter at `path` (the folder, or the adapter
    file in it): its `config.json` (validation prompts, trigger, sample seeds, resolution, steps) and the
    adapter samples `metrics.json` lists. Raises `RetentionUnavailable` saying what is missing."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    try:
        config = json.loads((folder / "config.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        raise RetentionUnavailable(
            "the earlier adapter came without its run's config.json and metrics.json, so its samples are unknown"
        ) from exc
    prompts: list[str] = list(config.get("validation_prompts") or [])
    trigger = str(config.get("trigger") or "")
    cases: list[tuple[str, int, Image.Image]] = []
    for relative in metrics.get("samples") or []:
        match = _SAMPLE_NAME.search(str(relative))
        file = folder / str(relative)
        if match is None or not file.is_file() or int(match["prompt"]) >= len(prompts):
            continue
        with Image.open(file) as image:
            cases.append(
                (resolve_caption(prompts[int(match["prompt"])], trigger), int(match["seed"]), image.convert("RGB"))
            )
    if not cases:
        raise RetentionUnavailable("the earlier run left no final adapter samples to compare with")
    cases = cases[:_MAX_CASES]
    side = int(config.get("resolution") or cases[0][2].width)
    steps = metrics.get("kept_step", metrics.get("steps"))
    return RetentionReference(
        source=folder.name,
        step=int(steps) if isinstance(steps, int) else None,
        prompts=[p for p, _, _ in cases],
        seeds=[s for _, s, _ in cases],
        images=[im for _, _, im in cases],
        width=side,
        height=side,
        num_steps=int(config.get("sample_steps") or 0),
    )


@dataclass(frozen=True)
class RetentionInputs:
    """A reference with its prompts encoded (made while the encoders are loaded, like the other evaluation inputs)."""

    reference: RetentionReference
    conds: list[Cond]  # per case


def prepare_retention(family: ModelFamily, reference: RetentionReference, text_max_length: int) -> RetentionInputs:
    """Encodes the reference's prompts with the family's text encoder (call before `release_encoders`)."""
    unique = sorted(set(reference.prompts))
    encoded = dict(zip(unique, family.encode_student(unique, text_max_length), strict=True))
    return RetentionInputs(reference, [encoded[p] for p in reference.prompts])


def _render(family: ModelFamily, inputs: RetentionInputs, adapter: str | None) -> torch.Tensor:
    """[N, 3, H, W] pixels in [0, 1] of every case on `adapter` (`None`: the base model), as the samples were
    made: the family's pipeline, one CPU generator seeded per image, 8-bit images."""
    ref = inputs.reference
    images = []
    with adapter_scope(family, adapter):
        for cond, seed in zip(inputs.conds, ref.seeds, strict=True):
            images += family.generate(
                [cond], seeds=[seed], width=ref.width, height=ref.height, num_steps=ref.num_steps
            )
    return torch.stack([pixels_from_image(im) for im in images])


def _retention(distance_new: list[float], distance_base: list[float]) -> list[float] | None:
    """Per case `1 - new / base`, over the cases where the earlier adapter drew anything the base model does
    not (`base` > 0); `None` when it drew nothing of its own."""
    values = [1.0 - n / b for n, b in zip(distance_new, distance_base, strict=True) if b > 0]
    return values or None


def _figure(name: str, title: str, definition: str, new: list[float], base: list[float]) -> Figure:
    values = _retention(new, base)
    if values is None:
        return Figure.missing(
            name, title, "retained fraction", definition, "the earlier adapter's samples are the base model's own"
        )
    return Figure(
        name=name,
        title=title,
        unit="retained fraction",
        definition=definition,
        per_seed=values,
        mean=sum(values) / len(values),
        ci95=bootstrap_mean_ci(values),
        noise_floor=None,
        base=sum(base) / len(base),
        adapter=sum(new) / len(new),
    )


def verdict_of(figure: Figure, thresholds: RetentionThresholds) -> str:
    """`kept` / `partly` / `lost` from the figure's 95% interval (its value, with one case)."""
    if figure.mean is None:
        return "not measured"
    low, high = figure.ci95 if figure.ci95 is not None else (figure.mean, figure.mean)
    if low >= thresholds.kept:
        return "kept"
    if high <= thresholds.lost:
        return "lost"
    return "partly"


_SUMMARIES = {
    "kept": "the new adapter draws the earlier adapter's samples again (same prompts and seeds): what it had "
    "learned is kept",
    "partly": "the new adapter's renders of the earlier prompts are between the earlier samples and the base "
    "model's: part of what it had learned is gone; look at the samples",
    "lost": "the new adapter draws the earlier prompts about as the base model does: what the earlier adapter had "
    "learned is lost; lower the learning rate or the steps of the continued run",
}


def measure_retention(
    family: ModelFamily,
    inputs: RetentionInputs,
    *,
    adapter: str | None = STUDENT_ADAPTER,
    embedder: Embedder | None = None,
    thresholds: RetentionThresholds = DEFAULT_RETENTION_THRESHOLDS,
) -> dict[str, Any]:
    """The retention section of a report: `adapter` and the base model render the earlier run's prompts at its
    seeds and settings, and both are compared with its final samples (see the module docstring)."""
    start = time.perf_counter()
    ref = inputs.reference
    earlier = torch.stack([pixels_from_image(im) for im in ref.images])
    was_training = bool(family.transformer.training)
    family.transformer.eval()
    try:
        new, base = _render(family, inputs, adapter), _render(family, inputs, None)
    finally:
        family.transformer.train(was_training)
    pixel = _figure(
        "retention_pixel",
        "retention of the earlier samples (pixels)",
        "per earlier sample (prompt, seed): 1 - MSE(new adapter's render, earlier sample) / MSE(base model's "
        "render, earlier sample), pixels in [0, 1], same prompt, seed and setting; 1 = drawn again exactly, 0 = as "
        "far as the base model",
        mse_per_sample(new, earlier).tolist(),
        mse_per_sample(base, earlier).tolist(),
    )
    verdict = verdict_of(pixel, thresholds)
    pixel = dataclasses.replace(pixel, verdict=verdict)
    figures = {pixel.name: pixel}
    embedding_definition = (
        "the same ratio with the image-embedding distance 1 - cosine similarity in place of the pixel MSE"
    )
    if embedder is None:
        figures["retention_embedding"] = Figure.missing(
            "retention_embedding", "retention (embedding)", "retained fraction", embedding_definition,
            "no image-embedding model folder is configured",
        )  # fmt: skip
    else:
        e_new, e_base, e_earlier = (embedder.embed_images(x) for x in (new, base, earlier))
        fig = _figure(
            "retention_embedding",
            f"retention (embedding, {embedder.name})",
            embedding_definition,
            (1 - (e_new * e_earlier).sum(-1)).clamp(min=0).tolist(),
            (1 - (e_base * e_earlier).sum(-1)).clamp(min=0).tolist(),
        )
        figures[fig.name] = dataclasses.replace(fig, verdict=verdict_of(fig, thresholds))
    summary = _SUMMARIES.get(verdict, pixel.not_measured or "")
    if pixel.mean is not None:
        ci = (
            f" (95% interval {pixel.ci95[0]:.2f} to {pixel.ci95[1]:.2f})" if pixel.ci95 else " (one image: indicative)"
        )
        summary = f"retention {pixel.mean:.2f}{ci}: {summary}"
    return {
        "schema": SCHEMA,
        "source": ref.source,
        "earlier_step": ref.step,
        "verdict": verdict,
        "summary": summary,
        "figures": {name: fig.to_dict() for name, fig in figures.items()},
        "cases": [{"prompt": p, "seed": s} for p, s in zip(ref.prompts, ref.seeds, strict=True)],
        "setting": {"width": ref.width, "height": ref.height, "num_steps": ref.num_steps},
        "thresholds": thresholds.to_dict(),
        "cost": {
            "seconds": time.perf_counter() - start,
            "forward_passes": 2 * len(ref.seeds) * ref.num_steps,
            "images": 2 * len(ref.seeds),
        },
    }


def unavailable(reason: str, thresholds: RetentionThresholds = DEFAULT_RETENTION_THRESHOLDS) -> dict[str, Any]:
    """The section of a run that continued an adapter whose earlier samples are not at hand: the reason, no figure."""
    return {
        "schema": SCHEMA,
        "verdict": "not measured",
        "summary": reason,
        "figures": {},
        "thresholds": thresholds.to_dict(),
    }


def add_to_report(path: Path, section: dict[str, Any]) -> None:
    """Writes the section into a written `report.json` (under `retention`)."""
    data = json.loads(path.read_text())
    data["retention"] = section
    path.write_text(json.dumps(data, indent=2) + "\n")
