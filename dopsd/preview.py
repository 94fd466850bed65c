"""`preview()`: the method's own sanity check before paying for training.

D-OPSD teaches the student what the base model already does when the teacher context shows it the target image.
So the base model conditioned on (reference image + prompt) through the teacher encoder, at the native few-step
setting, is what training can reach at best: if these images do not show the concept, training will not either.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from dopsd.config import DOPSDConfig
from dopsd.data import (
    buckets_for_resolution,
    image_files,
    load_image,
    nearest_bucket,
    resize_to_cover,
    resolve_caption,
)
from dopsd.evaluation.gate import teacher_visibility
from dopsd.evaluation.inputs import prepare_evaluation
from dopsd.evaluation.prompts import EVAL_SEEDS, PRIOR_PROMPTS
from dopsd.models.base import Cond, ModelFamily
from dopsd.models.loading import load_family_for
from dopsd.presets import get_preset
from dopsd.sampling import SampleSet, render_previews
from dopsd.trainer import resolve_device


TEACHER_CHECK_NAME = "teacher_check.json"


def preview(
    config: DOPSDConfig,
    out_dir: Path,
    *,
    family: ModelFamily | None = None,
) -> SampleSet:
    """Renders one zero-shot image per reference image and validation prompt (first sample seed) into `out_dir`,
    with a contact sheet; `family` lets a worker pass an already loaded model. Captions play no part: the prompts
    are the text, so images need none."""
    cfg = config
    if cfg.instance_data_dir is None:
        raise ValueError("a preview needs `instance_data_dir`, the folder of the reference images")
    preset = get_preset(cfg.preset)
    references = [
        (p.name, load_image(p, min_side=preset.min_image_side, name=p.name))
        for p in image_files(cfg.instance_data_dir)
    ]
    if family is None:
        device, dtype = resolve_device(cfg)
        family = load_family_for(cfg, device=device, dtype=dtype)
    buckets = buckets_for_resolution(cfg.resolution)
    text_max, context_max = cfg.student_max_sequence_length, cfg.teacher_max_sequence_length

    def encode(image: Image.Image, prompt: str) -> Cond:
        bucket = nearest_bucket(image.width, image.height, buckets)
        return family.encode_teacher(
            resize_to_cover(image, bucket), prompt, text_max_length=text_max, context_max_length=context_max
        )

    prompts = [resolve_caption(p, cfg.trigger) for p in cfg.validation_prompts]
    prior = preset.prior_prompts or PRIOR_PROMPTS
    try:
        # The teacher gate a training job would pass first, answered here too (`teacher_check.json`).
        gate_inputs = prepare_evaluation(
            family, references=references, concept_prompts=prompts, prior_prompts=prior[:1], width=cfg.resolution,
            height=cfg.resolution, num_steps=cfg.sample_steps, text_max_length=text_max,
            context_max_length=context_max, seeds=[EVAL_SEEDS[0]],
        )  # fmt: skip
        out_dir.mkdir(parents=True, exist_ok=True)
        check = teacher_visibility(family, gate_inputs)
        (out_dir / TEACHER_CHECK_NAME).write_text(json.dumps(check.to_dict(), indent=2) + "\n")
        return render_previews(
            family,
            references=references,
            prompts=prompts,
            seed=cfg.sample_seeds[0],
            width=cfg.resolution,
            height=cfg.resolution,
            num_steps=cfg.sample_steps,
            encode_teacher=encode,
            out_dir=out_dir,
        )
    finally:
        family.release_encoders()
