"""`prepare_evaluation`: everything an evaluation needs from the encoders, computed while they are still loaded.

The trainer caches its features and then frees the encoders, so the evaluation's conditions are encoded at the same
moment: the student (text-only) conditions of the held-out concept prompts and of the prior prompts, the teacher
conditions of (reference image + held-out prompt), the references' own latents and pixels, and one fixed noise per
seed (the same for base and adapter, so every comparison is paired).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image

from dopsd.data import buckets_for_resolution, nearest_bucket, resize_to_cover
from dopsd.evaluation.latents import encode_reference, pixels_from_image
from dopsd.evaluation.prompts import EVAL_SEEDS
from dopsd.models.base import Cond, ModelFamily


if TYPE_CHECKING:
    from dopsd.evaluation.evaluate import BaseMeasurements


DEFAULT_CONSISTENCY_FACTOR = 2
DEFAULT_CONSISTENCY_PROMPTS = 2  # 1 concept + 1 prior prompt at every seed: consistency costs 2x steps per image


@dataclass
class EvaluationInputs:
    """Cached conditions, references and noises of one evaluation; `measure` and `teacher_visibility` read them.

    Teacher case `i` pairs concept prompt `i` with reference `case_references[i]` (the references in turn), so a
    few prompts cover several references without encoding every (prompt, reference) pair.
    """

    concept_prompts: list[str]
    prior_prompts: list[str]
    adherence_prompts: list[str]  # the text of the CLIP prompt-adherence score, one per concept prompt
    concept_conds: list[Cond]
    prior_conds: list[Cond]
    teacher_conds: list[Cond]
    case_references: list[int]
    reference_names: list[str]
    reference_pixels: list[torch.Tensor]  # [3, H, W] in [0, 1] at the render size
    reference_latents: list[torch.Tensor]  # [1, ...] clean latents at the render size
    seeds: list[int]
    noises: torch.Tensor  # [S, ...] on the CPU, one per seed
    width: int
    height: int
    num_steps: int
    sigmas: list[float]  # the native inference schedule
    fine_sigmas: list[float]  # the same schedule at `consistency_factor` x the steps
    consistency_factor: int
    consistency_prompts: int
    encode_s: float
    baseline: BaseMeasurements | None = field(default=None, repr=False, compare=False)  # filled by `measure`


def _chunks(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def prepare_evaluation(
    family: ModelFamily,
    *,
    references: Sequence[tuple[str, Image.Image]],
    concept_prompts: Sequence[str],
    prior_prompts: Sequence[str],
    width: int,
    height: int,
    num_steps: int,
    text_max_length: int,
    context_max_length: int,
    seeds: Sequence[int] = EVAL_SEEDS,
    adherence_prompts: Sequence[str] | None = None,
    consistency_factor: int = DEFAULT_CONSISTENCY_FACTOR,
    consistency_prompts: int = DEFAULT_CONSISTENCY_PROMPTS,
    chunk_size: int = 8,
) -> EvaluationInputs:
    """Encodes the evaluation's conditions with the family's encoders (call before `release_encoders`).

    `concept_prompts`: held-out prompts with the trigger already in place (the validation prompts, not the training
    captions). `prior_prompts`: prompts without the trigger (`prior_prompts_with` adds the built-in set).
    `references`: (name, image) of the concept's reference images. `num_steps`: the model's native few-step count;
    renders use the family's own schedule for it. Student prompts are encoded `chunk_size` at a time, teacher
    contexts one at a time, so many prompts cannot exhaust accelerator memory.
    """
    if not concept_prompts or not prior_prompts or not references or not seeds:
        raise ValueError("an evaluation needs concept prompts, prior prompts, reference images and seeds")
    if adherence_prompts is not None and len(adherence_prompts) != len(concept_prompts):
        raise ValueError("`adherence_prompts` must give one text per concept prompt")
    if consistency_factor < 2:
        raise ValueError("`consistency_factor` must be at least 2")
    start = time.perf_counter()

    def student(prompts: Sequence[str]) -> list[Cond]:
        return [c for chunk in _chunks(prompts, chunk_size) for c in family.encode_student(chunk, text_max_length)]

    buckets = buckets_for_resolution(max(width, height))
    case_references = [i % len(references) for i in range(len(concept_prompts))]
    teacher_conds = []
    for prompt, r in zip(concept_prompts, case_references, strict=True):
        image = references[r][1]
        bucket = nearest_bucket(image.width, image.height, buckets)
        teacher_conds.append(
            family.encode_teacher(
                resize_to_cover(image, bucket),
                prompt,
                text_max_length=text_max_length,
                context_max_length=context_max_length,
            )
        )
    shape = family.latent_shape(width, height)
    noises = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds])
    inputs = EvaluationInputs(
        concept_prompts=list(concept_prompts),
        prior_prompts=list(prior_prompts),
        adherence_prompts=list(adherence_prompts or concept_prompts),
        concept_conds=student(concept_prompts),
        prior_conds=student(prior_prompts),
        teacher_conds=teacher_conds,
        case_references=case_references,
        reference_names=[name for name, _ in references],
        reference_pixels=[pixels_from_image(resize_to_cover(im, (width, height))) for _, im in references],
        reference_latents=[encode_reference(family, im, width, height) for _, im in references],
        seeds=list(seeds),
        noises=noises,
        width=width,
        height=height,
        num_steps=num_steps,
        sigmas=family.native_sigmas(num_steps, width, height),
        fine_sigmas=family.native_sigmas(num_steps * consistency_factor, width, height),
        consistency_factor=consistency_factor,
        consistency_prompts=max(1, consistency_prompts),
        encode_s=0.0,
    )
    inputs.encode_s = time.perf_counter() - start
    return inputs
