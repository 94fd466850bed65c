"""What the evaluation tests share: a tiny family on the CPU and the evaluation set a job would prepare."""

from __future__ import annotations

from pathlib import Path

import torch

from dopsd.config import DOPSDConfig
from dopsd.data import image_files, load_image, resolve_caption
from dopsd.evaluation import EvaluationInputs, prepare_evaluation, prior_prompts_with
from dopsd.evaluation.prompts import EVAL_SEEDS
from dopsd.models.base import ModelFamily
from dopsd.models.loading import load_family_for


def tiny_family(preset: str) -> tuple[DOPSDConfig, ModelFamily]:
    """The preset's config with its defaults and its model, fp32 on the CPU."""
    cfg = DOPSDConfig.for_preset(preset)
    return cfg, load_family_for(cfg, device=torch.device("cpu"), dtype=torch.float32)


def evaluation_set(
    family: ModelFamily,
    cfg: DOPSDConfig,
    images: Path,
    *,
    seeds: int = len(EVAL_SEEDS),
    prompts: int | None = None,
    priors: int | None = None,
) -> EvaluationInputs:
    """The example concept's evaluation set: the validation prompts (the first `prompts`), the built-in prior
    prompts (the first `priors`), the first `seeds` evaluation seeds, at the preset's resolution and steps."""
    references = [(p.name, load_image(p, min_side=32, name=p.name)) for p in image_files(images)]
    concept = [resolve_caption(p, "sks") for p in cfg.validation_prompts][:prompts]
    return prepare_evaluation(
        family,
        references=references,
        concept_prompts=concept,
        prior_prompts=prior_prompts_with(None)[:priors],
        seeds=EVAL_SEEDS[:seeds],
        width=cfg.resolution,
        height=cfg.resolution,
        num_steps=cfg.sample_steps,
        text_max_length=cfg.student_max_sequence_length,
        context_max_length=cfg.teacher_max_sequence_length,
    )
