"""FLUX.2-klein behind the `ModelFamily` interface.

Conventions hidden here: the transformer takes sigma itself (1 = noise) and returns v = noise - x0 (pointing toward
the noise), on packed tokens with 4-D position ids (T, H, W, L). So x0 = x - sigma * v and an Euler step is
x + (sigma_next - sigma) * v. Latents are kept as the pipeline's patchified [C, H/2, W/2] grids and packed per call.

Two teacher contexts (`teacher_context`):
- `edit` (default, the authors' choice for klein): the model's own editing branch. The target image is VAE-encoded
  and appended as reference tokens (time coordinate 10, as `Flux2KleinPipeline(image=...)` does), the prompt is the
  caption plus a fixed consistency instruction, and the output is cropped to the generated tokens.
- `vlm`: Qwen3-VL of the matching size with its language model overwritten by the klein text encoder; its hidden
  states at the pipeline's layers, concatenated, padded like the pipeline pads.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from PIL import Image

from dopsd.data import resize_to_cover
from dopsd.models.base import ModelFamily
from dopsd.models.qwen_teacher import QwenVLTeacherEncoder


# The edit-branch teacher's instruction, verbatim as the released klein scripts pass it (`edit_sys_prompt`), and
# joined to the caption as they join it: f"{caption} {instruction}".strip().
CONSISTENCY_INSTRUCTION = (
    "Make the main subject (facial/ip details), background, and overall composition consistent with the reference "
    "image."
)
RELEASED_ROLLOUT_STEPS = 4  # the released script's `num_training_steps` for klein
REFERENCE_TIME_COORDINATE = 10  # `_prepare_image_ids`: the first reference image sits at T = 10
# The pipeline refuses a reference image (`image=`) with a side under this (`Flux2ImageProcessor.check_image_input`,
# "Image too small: WxH. Both dimensions must be at least 64px"); the aspect buckets of a small resolution (80x48
# at 64 px) fall under it, so the edit teacher's reference is enlarged to it before it is encoded or rendered.
MIN_REFERENCE_SIDE = 64


def reference_image(image: Image.Image, multiple: int, min_side: int = MIN_REFERENCE_SIDE) -> Image.Image:
    """`image` as the edit teacher's reference: unchanged when both sides reach `min_side`, otherwise enlarged
    (aspect kept, sides rounded up to `multiple`) so the pipeline accepts it when samples are rendered, and the
    training teacher sees the very same reference tokens."""
    short = min(image.size)
    if short >= min_side:
        return image
    scale = min_side / short
    size = (
        math.ceil(image.width * scale / multiple) * multiple,
        math.ceil(image.height * scale / multiple) * multiple,
    )
    return resize_to_cover(image, size)


def teacher_edit_prompt(caption: str) -> str:
    """The edit-branch teacher's prompt: the caption and the fixed consistency instruction, as the released code
    builds it."""
    return f"{caption} {CONSISTENCY_INSTRUCTION}".strip()


@dataclass(frozen=True)
class KleinCond:
    """Klein conditioning of one sample: text features, and for the edit teacher the reference image tokens."""

    embeds: torch.Tensor  # [L, 3 * hidden]
    ref_tokens: torch.Tensor | None = None  # [N_ref, C] packed, normalised reference latents
    ref_ids: torch.Tensor | None = None  # [N_ref, 4]
    ref_image: Image.Image | None = None  # for sampling the teacher context with the pipeline


class Flux2KleinFamily(ModelFamily):
    """FLUX.2-klein (4B / 9B) with the edit-branch or the Qwen3-VL teacher context."""

    name = "flux2_klein"
    # Double-stream blocks only, by full module path suffix: "attn.to_out.0" is the Linear inside the double
    # blocks' to_out ModuleList (a bare "to_out" would hit the ModuleList and the single blocks' fused Linear).
    lora_target_modules = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
    )
    chat_template_kwargs: ClassVar[dict[str, Any]] = {"enable_thinking": False}
    guidance_scale = 1.0  # the distilled model runs without classifier-free guidance

    def __init__(
        self,
        pipeline: Flux2KleinPipeline,
        *,
        text_layers: tuple[int, ...],
        teacher_context: str,
        teacher_encoder: QwenVLTeacherEncoder | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(pipeline, teacher_encoder, device=device, dtype=dtype)
        if teacher_context == "vlm" and teacher_encoder is None:
            raise ValueError("the `vlm` teacher context needs a Qwen3-VL teacher encoder")
        self.text_layers = text_layers
        self.teacher_context = teacher_context

    @torch.no_grad()
    def _text_features(self, prompts: Sequence[str], max_sequence_length: int) -> list[torch.Tensor]:
        self._encoders_to(self.device)
        embeds, _ = self.pipeline.encode_prompt(
            list(prompts),
            device=self.device,
            max_sequence_length=max_sequence_length,
            text_encoder_out_layers=self.text_layers,
        )
        return [e.detach() for e in embeds]

    def encode_student(self, captions: Sequence[str], max_sequence_length: int) -> list[KleinCond]:
        return [KleinCond(e) for e in self._text_features(captions, max_sequence_length)]

    @torch.no_grad()
    def _reference_tokens(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """The target image as the pipeline turns a reference image into tokens (VAE, patchify, BN, pack)."""
        pipe = self.pipeline
        multiple = pipe.vae_scale_factor * 2
        width, height = (image.width // multiple) * multiple, (image.height // multiple) * multiple
        pixels = pipe.image_processor.preprocess(image, height=height, width=width, resize_mode="crop")
        latents = pipe.prepare_image_latents(
            images=[pixels], batch_size=1, generator=None, device=self.device, dtype=pipe.vae.dtype
        )
        tokens, ids = latents
        return tokens[0], ids[0]

    @torch.no_grad()
    def encode_teacher(
        self, image: Image.Image, caption: str, *, text_max_length: int, context_max_length: int
    ) -> KleinCond:
        if self.teacher_context == "edit":
            prompt = teacher_edit_prompt(caption)
            embeds = self._text_features([prompt], text_max_length)[0]
            reference = reference_image(image, self.pipeline.vae_scale_factor * 2)
            tokens, ids = self._reference_tokens(reference)
            return KleinCond(embeds, tokens, ids, reference)
        assert self.teacher_encoder is not None
        self._encoders_to(self.device)
        feats = self.teacher_encoder.encode(
            image, caption, max_length=context_max_length, hidden_layers=self.text_layers, pad_to=text_max_length
        )
        return KleinCond(feats.to(self.dtype))

    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        scale = self.pipeline.vae_scale_factor * 2
        lat_h, lat_w = 2 * (height // scale), 2 * (width // scale)
        return (self.pipeline.transformer.config.in_channels, lat_h // 2, lat_w // 2)

    def _forward(self, latents: torch.Tensor, sigma: float, conds: Sequence[KleinCond]) -> torch.Tensor:
        pipe = self.pipeline
        batch, channels, height, width = latents.shape
        tokens = pipe._pack_latents(latents)  # [B, H*W, C]
        ids = pipe._prepare_latent_ids(latents).to(latents.device)
        refs = [(c.ref_tokens, c.ref_ids) for c in conds if c.ref_tokens is not None and c.ref_ids is not None]
        if refs:
            tokens = torch.cat([tokens, torch.stack([t for t, _ in refs]).to(tokens.dtype)], dim=1)
            ids = torch.cat([ids, torch.stack([i for _, i in refs]).to(ids.device)], dim=1)
        embeds = torch.stack([c.embeds for c in conds])
        out = self.transformer(
            hidden_states=tokens.to(self.transformer.dtype),
            timestep=torch.full((batch,), sigma, device=latents.device, dtype=torch.float32).to(tokens.dtype),
            guidance=None,
            encoder_hidden_states=embeds.to(self.transformer.dtype),
            txt_ids=pipe._prepare_text_ids(embeds).to(latents.device),
            img_ids=ids,
            return_dict=False,
        )[0]
        out = out[:, : height * width]  # the teacher's reference tokens are context, not output
        return out.permute(0, 2, 1).reshape(batch, channels, height, width).float()

    def predict(self, latents: torch.Tensor, sigma: float, conds: Sequence[KleinCond]) -> torch.Tensor:
        shapes = {(c.embeds.shape[0], None if c.ref_tokens is None else c.ref_tokens.shape[0]) for c in conds}
        if len(shapes) == 1:
            return self._forward(latents, sigma, conds)
        # Sequences of different lengths (VLM teacher contexts) cannot share one batch.
        return torch.cat([self._forward(latents[i : i + 1], sigma, [c]) for i, c in enumerate(conds)])

    def x0_from_prediction(self, latents: torch.Tensor, sigma: float, prediction: torch.Tensor) -> torch.Tensor:
        return latents - sigma * prediction

    def euler_step(
        self, latents: torch.Tensor, sigma: float, sigma_next: float, prediction: torch.Tensor
    ) -> torch.Tensor:
        return latents + (sigma_next - sigma) * prediction

    def _image_seq_len(self, width: int, height: int) -> int:
        _, h, w = self.latent_shape(width, height)
        return h * w

    def native_sigmas(self, num_steps: int, width: int, height: int) -> list[float]:
        """`Flux2KleinPipeline`'s schedule: explicit sigmas linspace(1, 1/n, n) shifted by the empirical mu."""
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
        mu = compute_empirical_mu(image_seq_len=self._image_seq_len(width, height), num_steps=num_steps)
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        return [float(s) for s in scheduler.sigmas]

    def released_sigmas(self, width: int, height: int) -> list[float]:
        """The released klein script's roll-out: `scheduler.set_timesteps(4, mu=...)` with the empirical mu and no
        explicit sigmas, so the scheduler's own timesteps (1000 .. 1 linearly) are shifted: at 1 MP about 1, .952,
        .832, .0098 -> 0, against the pipeline's 1, .967, .908, .767 -> 0."""
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        steps = RELEASED_ROLLOUT_STEPS
        scheduler.set_timesteps(
            steps, mu=compute_empirical_mu(image_seq_len=self._image_seq_len(width, height), num_steps=steps)
        )
        return [float(s) for s in scheduler.sigmas]

    def generate_one(
        self, cond: KleinCond, *, generator: torch.Generator, width: int, height: int, num_steps: int
    ) -> Image.Image:
        out = self.pipeline(
            image=[cond.ref_image] if cond.ref_image is not None else None,
            prompt_embeds=cond.embeds[None],
            height=height,
            width=width,
            num_inference_steps=num_steps,
            guidance_scale=self.guidance_scale,
            generator=generator,
            text_encoder_out_layers=self.text_layers,
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
        """`Flux2KleinPipeline(prompt=[...], generator=[...])` with the family's text-encoder layers; the distilled
        pipeline (`is_distilled`) ignores guidance above 1 (its native setting is 1.0), a base klein runs CFG."""
        if len(prompts) != len(generators):
            raise ValueError(f"{len(prompts)} prompts but {len(generators)} generators")
        self._text_encoder_on_device()
        extra: dict[str, Any] = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        out = self.pipeline(
            prompt=list(prompts),
            height=height,
            width=width,
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            generator=list(generators),
            text_encoder_out_layers=self.text_layers,
            **extra,
        )
        return list(out.images)
