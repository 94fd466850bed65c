"""Z-Image (Turbo) behind the `ModelFamily` interface.

Conventions hidden here: the transformer takes model time t = 1 - sigma (0 = noise, 1 = clean) and returns
v = x0 - noise (pointing toward the data), on lists of [C, 1, H, W] latents; `ZImagePipeline` negates v before its
scheduler step. So x0 = x + sigma * v and an Euler step is x + (sigma - sigma_next) * v.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from diffusers import ZImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift
from PIL import Image

from dopsd.config import DISTILL4_SIGMAS
from dopsd.models.base import Cond, ModelFamily
from dopsd.models.qwen_teacher import QwenVLTeacherEncoder


class ZImageFamily(ModelFamily):
    """Z-Image with a Qwen3-VL teacher encoder (the released D-OPSD setup)."""

    name = "z_image"
    # Every transformer block, refiners included: attention q/k/v/out and the SwiGLU feed-forward (the released
    # code lost w1 to a missing comma; all seven are asserted by a test).
    lora_target_modules = (
        "attention.to_q",
        "attention.to_k",
        "attention.to_v",
        "attention.to_out.0",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    )
    # The Z-Image pipeline's own chat-template call (thinking "on" renders no think block).
    chat_template_kwargs: ClassVar[dict[str, Any]] = {"enable_thinking": True}

    def __init__(
        self,
        pipeline: ZImagePipeline,
        teacher_encoder: QwenVLTeacherEncoder,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(pipeline, teacher_encoder, device=device, dtype=dtype)
        self.vlm_encoder = teacher_encoder  # always present for Z-Image

    @torch.no_grad()
    def encode_student(self, captions: Sequence[str], max_sequence_length: int) -> list[Cond]:
        self._encoders_to(self.device)
        embeds, _ = self.pipeline.encode_prompt(
            list(captions),  # the pipeline rewrites the list in place
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return [e.detach() for e in embeds]

    @torch.no_grad()
    def encode_teacher(
        self, image: Image.Image, caption: str, *, text_max_length: int, context_max_length: int
    ) -> Cond:
        self._encoders_to(self.device)
        return self.vlm_encoder.encode(image, caption, max_length=context_max_length, hidden_layers=(-2,))

    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        scale = self.pipeline.vae_scale_factor * 2
        return (self.pipeline.transformer.config.in_channels, 2 * (height // scale), 2 * (width // scale))

    def predict(self, latents: torch.Tensor, sigma: float, conds: Sequence[Cond]) -> torch.Tensor:
        t = torch.full((latents.shape[0],), 1.0 - sigma, device=latents.device, dtype=torch.float32)
        # The weight dtype, read off the first parameter (the image pad token, a base weight, never a LoRA tensor):
        # `transformer.dtype` walks every module for casting hooks on each of a step's 8 calls (1.08x step CPU time).
        weight_dtype = next(self.transformer.parameters()).dtype
        x = list(latents.to(weight_dtype).unsqueeze(2).unbind(0))
        out = self.transformer(x, t, list(conds), return_dict=False)[0]
        return torch.stack(out, dim=0).squeeze(2).float()

    def x0_from_prediction(self, latents: torch.Tensor, sigma: float, prediction: torch.Tensor) -> torch.Tensor:
        return latents + sigma * prediction

    def euler_step(
        self, latents: torch.Tensor, sigma: float, sigma_next: float, prediction: torch.Tensor
    ) -> torch.Tensor:
        return latents + (sigma - sigma_next) * prediction

    def native_sigmas(self, num_steps: int, width: int, height: int) -> list[float]:
        _, h, w = self.latent_shape(width, height)
        config = self.pipeline.scheduler.config
        mu = calculate_shift(
            (h // 2) * (w // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps).tolist()
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        return [float(s) for s in scheduler.sigmas]

    def released_sigmas(self, width: int, height: int) -> list[float]:
        """The released Z-Image script's roll-out: model time t = 0, .1, .25, .5, then clean (sigmas 1, .9, .75, .5
        -> 0, Turbo's own shifted 4-step schedule), at every resolution."""
        return list(DISTILL4_SIGMAS)

    def generate_one(
        self, cond: Cond, *, generator: torch.Generator, width: int, height: int, num_steps: int
    ) -> Image.Image:
        out = self.pipeline(
            prompt_embeds=[cond],
            height=height,
            width=width,
            num_inference_steps=num_steps,
            guidance_scale=0.0,  # Turbo runs without classifier-free guidance
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
        """`ZImagePipeline(prompt=[...], generator=[...])`; guidance above 0 runs the pipeline's CFG against the empty
        negative prompt (Turbo's native setting is 0: none)."""
        if len(prompts) != len(generators):
            raise ValueError(f"{len(prompts)} prompts but {len(generators)} generators")
        self._text_encoder_on_device()
        extra: dict[str, Any] = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        out = self.pipeline(
            prompt=list(prompts),  # the pipeline rewrites the list in place
            height=height,
            width=width,
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            generator=list(generators),
            **extra,
        )
        return list(out.images)
