"""The `shapes` world's model behind the `ModelFamily` interface: FLUX.2-klein conventions in 2x2-packed pixel space.

The model (`dopsd.shapes.model.ShapesModel`) is a real `Flux2Transformer2DModel` with a word-level caption encoder and
no VAE: its "latents" are the 16x16 pixels in [-1, 1], patchified 2x2 as `Flux2KleinPipeline._patchify_latents`
patchifies latents ([12, 8, 8]). Everything else is klein's, so the family reuses `Flux2KleinFamily` unchanged for
the transformer call, x0, the Euler step and the edit-branch teacher (the reference tokens at time coordinate 10):
- `ShapesPipeline`, a small diffusers pipeline with klein's packing and position-id methods and FLUX.2's LoRA loader,
  so adapters save and load as `Flux2KleinPipeline` adapters do;
- sampling is Euler over linspace(1, 0, n + 1), the schedule the model was trained and distilled for (16x16 images
  need no resolution shift);
- the edit teacher's prompt is the caption itself: the world's in-context pretraining used plain captions, and the
  consistency instruction of real klein is not in its vocabulary.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.loaders import Flux2LoraLoaderMixin
from PIL import Image

from dopsd.data import resize_to_cover
from dopsd.models.base import ModelFamily
from dopsd.models.flux2_klein import Flux2KleinFamily, KleinCond
from dopsd.shapes import SCHEME
from dopsd.shapes.model import (
    REFERENCE_TIME_COORDINATE,
    CaptionEncoder,
    load_model,
    patchify,
    sigma_schedule,
    unpatchify,
)


WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "shapes" / "weights"


def weights_path(base: str) -> Path:
    """The safetensors file of a `shapes` base model id: `shapes://NAME` (a committed model) or a file path."""
    if base.startswith(SCHEME):
        return WEIGHTS_DIR / f"{base.removeprefix(SCHEME)}.safetensors"
    return Path(base)


@dataclass
class ShapesPipelineOutput:
    """What `ShapesPipeline.__call__` returns, named as diffusers pipelines name it."""

    images: list[Image.Image]


class ShapesPipeline(DiffusionPipeline, Flux2LoraLoaderMixin):
    """The `shapes` model as a diffusers pipeline: caption encoder + `Flux2Transformer2DModel`, Euler sampling in
    packed pixel space, and `Flux2LoraLoaderMixin`'s adapter saving, loading and mixing."""

    model_cpu_offload_seq = "text_encoder->transformer"
    vae = None
    vae_scale_factor = 1  # no VAE: latents are patchified pixels, so sizes need only be even
    _pack_latents = staticmethod(Flux2KleinPipeline._pack_latents)
    _prepare_latent_ids = staticmethod(Flux2KleinPipeline._prepare_latent_ids)
    _prepare_text_ids = staticmethod(Flux2KleinPipeline._prepare_text_ids)
    _prepare_image_ids = staticmethod(Flux2KleinPipeline._prepare_image_ids)
    _patchify = staticmethod(patchify)  # pixels [B, 3, H, W] -> latents [B, 12, H/2, W/2]
    _unpatchify = staticmethod(unpatchify)

    def __init__(self, transformer: Flux2Transformer2DModel, text_encoder: CaptionEncoder) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder)

    @classmethod
    def from_weights(cls, base: str) -> ShapesPipeline:
        """The pipeline of a committed model (`shapes://base`, `shapes://distilled`) or of a safetensors file."""
        path = weights_path(base)
        if not path.is_file():
            raise FileNotFoundError(f"no shapes model weights at {path}")
        model = load_model(path)
        return cls(transformer=model.transformer, text_encoder=model.text)

    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Caption features [B, MAX_TOKENS, D]; a word outside the world's vocabulary is a `ValueError`."""
        text_encoder: CaptionEncoder = self.text_encoder
        return text_encoder.encode(list(prompts))

    def reference_tokens(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """A reference image as edit-branch tokens [N, 12] and their (T=10, h, w, 0) ids [N, 4]."""
        pixels = pixels_from_image(image)[None].to(self.device)
        packed = patchify(pixels)
        ids = self._prepare_latent_ids(packed)
        ids[..., 0] = REFERENCE_TIME_COORDINATE
        return self._pack_latents(packed)[0], ids[0].to(self.device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Sequence[str] | None = None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        image: Sequence[Image.Image] | None = None,
        height: int = 16,
        width: int = 16,
        num_inference_steps: int = 4,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> ShapesPipelineOutput:
        """Images for `prompt` (or precomputed `prompt_embeds`), one per prompt, each from its own generator when a
        list is given; `image` (one per prompt, or one for all) goes to the edit branch as the reference."""
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("give `prompt` or `prompt_embeds`")
            embeds = self.encode_prompt(prompt)
        else:
            embeds = prompt_embeds.to(self.device)
        batch = embeds.shape[0]
        generators = list(generator) if isinstance(generator, Sequence) else [generator] * batch
        if len(generators) != batch:
            raise ValueError(f"{batch} prompts but {len(generators)} generators")
        noise = [torch.randn((1, 3, height, width), generator=g) for g in generators]
        latents = patchify(torch.cat(noise)).to(self.device)
        tokens_ids = None
        if image:
            refs = [self.reference_tokens(im) for im in (image if len(image) == batch else list(image) * batch)]
            tokens_ids = (torch.stack([t for t, _ in refs]), torch.stack([i for _, i in refs]))
        for sigma, sigma_next in itertools.pairwise(sigma_schedule(num_inference_steps)):
            v = self.velocity(latents, sigma, embeds, tokens_ids)
            latents = latents + (sigma_next - sigma) * v
        pixels = unpatchify(latents).clamp(-1, 1)
        return ShapesPipelineOutput([image_from_pixels(p) for p in pixels])

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: float,
        embeds: torch.Tensor,
        reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Klein's v = noise - x0 for packed-pixel latents [B, 12, h, w], optionally with reference tokens."""
        batch, channels, h, w = latents.shape
        tokens = self._pack_latents(latents)
        ids = self._prepare_latent_ids(latents).to(latents.device)
        if reference is not None:
            tokens = torch.cat([tokens, reference[0].to(tokens.dtype)], dim=1)
            ids = torch.cat([ids, reference[1].to(ids.device)], dim=1)
        out = self.transformer(
            hidden_states=tokens,
            timestep=torch.full((batch,), sigma, device=latents.device, dtype=tokens.dtype),
            guidance=None,
            encoder_hidden_states=embeds.to(tokens.dtype),
            txt_ids=self._prepare_text_ids(embeds).to(latents.device),
            img_ids=ids,
            return_dict=False,
        )[0]
        return out[:, : h * w].permute(0, 2, 1).reshape(batch, channels, h, w)


def pixels_from_image(image: Image.Image) -> torch.Tensor:
    """An RGB image as [3, H, W] pixels in [-1, 1] (the model's space), fp32."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def image_from_pixels(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] pixels in [-1, 1] as an RGB image."""
    array = ((pixels.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


class ShapesFamily(Flux2KleinFamily):
    """The `shapes` world's FLUX.2-klein model: klein's transformer conventions and edit-branch teacher, pixel
    latents, a closed caption vocabulary."""

    name = "shapes"

    def __init__(self, pipeline: ShapesPipeline, *, device: torch.device, dtype: torch.dtype) -> None:
        ModelFamily.__init__(self, pipeline, None, device=device, dtype=dtype)
        self.text_layers = ()
        self.teacher_context = "edit"

    @torch.no_grad()
    def _text_features(self, prompts: Sequence[str], max_sequence_length: int) -> list[torch.Tensor]:
        self._encoders_to(self.device)
        pipe: ShapesPipeline = self.pipeline
        return [e.detach() for e in pipe.encode_prompt(prompts)]

    @torch.no_grad()
    def encode_teacher(
        self, image: Image.Image, caption: str, *, text_max_length: int, context_max_length: int
    ) -> KleinCond:
        pipe: ShapesPipeline = self.pipeline
        embeds = self._text_features([caption], text_max_length)[0]
        _, height, width = self.latent_shape(image.width, image.height)
        reference = resize_to_cover(image.convert("RGB"), (2 * width, 2 * height))
        tokens, ids = pipe.reference_tokens(reference)
        return KleinCond(embeds, tokens, ids, reference)

    def native_sigmas(self, num_steps: int, width: int, height: int) -> list[float]:
        """linspace(1, 0, n + 1): the schedule `ShapesPipeline` samples with and the model was made for."""
        return sigma_schedule(num_steps)

    def released_sigmas(self, width: int, height: int) -> list[float]:
        """No released script exists for this world; the roll-out is the model's own 4-step schedule."""
        return sigma_schedule(4)

    def generate_one(
        self, cond: KleinCond, *, generator: torch.Generator, width: int, height: int, num_steps: int
    ) -> Image.Image:
        out = self.pipeline(
            prompt_embeds=cond.embeds[None],
            image=[cond.ref_image] if cond.ref_image is not None else None,
            height=height,
            width=width,
            num_inference_steps=num_steps,
            generator=generator,
        )
        image: Image.Image = out.images[0]
        return image

    @torch.no_grad()
    def text_to_image(
        self,
        prompts: Sequence[str],
        generators: Sequence[torch.Generator],
        *,
        width: int,
        height: int,
        num_steps: int,
        guidance_scale: float,
        max_sequence_length: int | None = None,
    ) -> list[Image.Image]:
        """`ShapesPipeline(prompt=[...], generator=[...])`; the model has no guidance (a distilled klein ignores it
        too), so `guidance_scale` and `max_sequence_length` (captions are at most 8 words) change nothing."""
        if len(prompts) != len(generators):
            raise ValueError(f"{len(prompts)} prompts but {len(generators)} generators")
        self._text_encoder_on_device()
        out: Any = self.pipeline(
            prompt=list(prompts), height=height, width=width, num_inference_steps=num_steps, generator=generators
        )
        return list(out.images)


def shapes_family(base: str, *, device: torch.device, dtype: torch.dtype) -> ShapesFamily:
    """The `shapes` family of a committed model id or a weights file, on `device` in `dtype`."""
    pipe = ShapesPipeline.from_weights(base)
    pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    return ShapesFamily(pipe, device=device, dtype=dtype)
