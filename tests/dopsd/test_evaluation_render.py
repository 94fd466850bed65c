"""The evaluation renders what a user of the unchanged pipeline gets, and its sharpness index sees blur."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFilter

from dopsd.evaluation.image_metrics import laplacian_variance
from dopsd.evaluation.latents import decode_latents, image_from_pixels, pixels_from_image
from dopsd.evaluation.render import render
from tests.dopsd.evaluation_helpers import evaluation_set, tiny_family


@pytest.mark.parametrize("preset", ["tiny-z-image", "tiny-flux2-klein"])
def test_render_is_the_pipeline_image_for_the_same_seed(preset: str, example_dir: Path) -> None:
    """Same noise, native schedule and update as the pipeline: the decoded render equals the pipeline's image (up to
    its 8-bit rounding), so the report judges the images users will get."""
    cfg, family = tiny_family(preset)
    inputs = evaluation_set(family, cfg, example_dir, seeds=1, prompts=2, priors=2)
    rollout = render(
        family, noises=inputs.noises.repeat(2, 1, 1, 1), conds=inputs.concept_conds, sigmas=inputs.sigmas, adapter=None
    )
    assert rollout.forwards == 2 * cfg.sample_steps
    ours = decode_latents(family, rollout.latents)
    for i, cond in enumerate(inputs.concept_conds):
        image = family.generate_one(
            cond,
            generator=torch.Generator().manual_seed(inputs.seeds[0]),
            width=inputs.width,
            height=inputs.height,
            num_steps=cfg.sample_steps,
        )
        assert (pixels_from_image(image) - ours[i]).abs().max() <= 1.0 / 255
    assert (ours[0] - ours[1]).abs().max() > 0  # different prompts, different images


def test_sharpness_index_falls_with_blur_and_rises_with_noise(example_dir: Path) -> None:
    image = next(example_dir.glob("*.png"))
    sharp = Image.open(image).convert("RGB").resize((64, 64))
    pixels = pixels_from_image(sharp)
    blurred = pixels_from_image(sharp.filter(ImageFilter.GaussianBlur(2)))
    noisy = (pixels + 0.1 * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    index = laplacian_variance(torch.stack([pixels, blurred, noisy]))
    assert index[1] < 0.5 * index[0] < index[0] < index[2]
    assert pixels_from_image(image_from_pixels(pixels)).sub(pixels).abs().max() < 1e-6
