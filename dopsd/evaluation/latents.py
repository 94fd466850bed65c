"""Between a family's latents and pixels: decode a sample the way its pipeline does, encode a reference image the
way its pipeline encodes one, so evaluation can compare in either space.

Kept here, by family name, because `ModelFamily` has no decode step (its pipelines decode inside `__call__`);
each function restates the pipeline's last lines exactly (diffusers 0.42), and a test checks the evaluation's own
render against the pipeline's image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from dopsd.data import resize_to_cover
from dopsd.models.base import ModelFamily


def _klein_bn(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


@torch.no_grad()
def decode_latents(family: ModelFamily, latents: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] (fp32, on the CPU) from a batch of the family's latents, as its pipeline
    decodes them: Z-Image un-scales and un-shifts; FLUX.2 un-normalises its patchified latents and unpatchifies."""
    pipe: Any = family.pipeline
    if family.name == "shapes":  # pixel space: latents are the patchified pixels in [-1, 1]
        pixels = pipe._unpatchify(latents.float())
        return (pixels / 2 + 0.5).clamp(0, 1).cpu()
    vae = pipe.vae
    x = latents.to(family.device, vae.dtype)
    if family.name == "flux2_klein":
        mean, std = _klein_bn(vae, x)
        x = pipe._unpatchify_latents(x * std + mean)
    elif family.name == "z_image":
        x = x / vae.config.scaling_factor + vae.config.shift_factor
    else:
        raise ValueError(f"no decoder for model family {family.name!r}")
    pixels = vae.decode(x, return_dict=False)[0]
    return (pixels.float() / 2 + 0.5).clamp(0, 1).cpu()


def pixels_from_image(image: Image.Image) -> torch.Tensor:
    """An RGB image as a [3, H, W] tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def image_from_pixels(pixels: torch.Tensor) -> Image.Image:
    """A [3, H, W] tensor in [0, 1] as an RGB image, rounded as the pipelines' post-processing rounds."""
    array = (pixels.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


@torch.no_grad()
def encode_reference(family: ModelFamily, image: Image.Image, width: int, height: int) -> torch.Tensor:
    """A reference image as the family's clean latents [1, ...] of a `width` x `height` sample (resized to cover
    and centre-cropped), on the CPU in fp32: the target a concept sample is compared with in latent space."""
    pipe: Any = family.pipeline
    pixels = pixels_from_image(resize_to_cover(image, (width, height)))[None] * 2 - 1
    if family.name == "shapes":
        return pipe._patchify(pixels).float().cpu()
    vae = pipe.vae
    encoded = vae.encode(pixels.to(family.device, vae.dtype)).latent_dist.mode()
    if family.name == "flux2_klein":
        patched = pipe._patchify_latents(encoded)
        mean, std = _klein_bn(vae, patched)
        latents = (patched - mean) / std
    elif family.name == "z_image":
        latents = (encoded - vae.config.shift_factor) * vae.config.scaling_factor
    else:
        raise ValueError(f"no encoder for model family {family.name!r}")
    return latents.float().cpu()
