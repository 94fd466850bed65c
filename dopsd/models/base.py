"""The interface every model family implements, so the D-OPSD loop never sees a family's conventions.

Time is always passed as sigma (1 = pure noise, 0 = clean). A family's raw prediction keeps its own sign and
meaning; only the family turns it into x0 or takes an Euler step with it, so the trainer works unchanged on
Z-Image (t = 1 - sigma, output toward the data) and FLUX.2 (sigma, output toward the noise).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from peft.helpers import disable_input_dtype_casting
from PIL import Image

from dopsd.models.qwen_teacher import QwenVLTeacherEncoder


Cond = Any  # a family's conditioning for one sample (e.g. Z-Image: a [L, D] tensor of caption features)


class ModelFamily(ABC):
    """A loaded base pipeline plus its teacher encoder, behind the operations D-OPSD needs."""

    name: ClassVar[str]
    lora_target_modules: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        teacher_encoder: QwenVLTeacherEncoder | None,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.pipeline = pipeline
        self.teacher_encoder = teacher_encoder
        self.device = device
        self.dtype = dtype
        for module in (pipeline.text_encoder, pipeline.vae):
            # encode_prompt is not wrapped in no_grad: frozen encoders keep graphs out of the embeddings.
            if module is not None:  # a pixel-space model (`shapes`) has no VAE
                module.requires_grad_(False).eval()
        pipeline.set_progress_bar_config(disable=True)

    @property
    def transformer(self) -> Any:
        """The denoiser (a diffusers model with peft's adapter mixin) that carries the LoRA adapters."""
        return self.pipeline.transformer

    # Conditioning: computed once per (image, caption) before training, then the encoders leave the device.
    @abstractmethod
    def encode_student(self, captions: Sequence[str], max_sequence_length: int) -> list[Cond]:
        """Text-only features of each caption, exactly as the family's pipeline encodes a prompt."""

    @abstractmethod
    def encode_teacher(
        self, image: Image.Image, caption: str, *, text_max_length: int, context_max_length: int
    ) -> Cond:
        """The teacher context of (target image + caption), differing from the student's only by the image.

        `text_max_length` is the student's caption limit (a text-only teacher prompt is padded alike);
        `context_max_length` caps a multimodal sequence, image tokens included.
        """

    def _encoders_to(self, device: torch.device) -> None:
        """Moves the text and teacher encoders to `device`."""
        self.pipeline.text_encoder.to(device)
        if self.teacher_encoder is not None:
            self.teacher_encoder.vlm.to(device)

    def release_encoders(self) -> None:
        """Frees the text and teacher encoders from the accelerator once all features are cached."""
        self._encoders_to(torch.device("cpu"))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # Denoising in the family's own convention.
    @abstractmethod
    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        """Shape of one sample's initial noise for an image of `width` x `height` pixels."""

    @abstractmethod
    def predict(self, latents: torch.Tensor, sigma: float, conds: Sequence[Cond]) -> torch.Tensor:
        """The network's raw prediction for a batch of latents at noise level `sigma`."""

    @abstractmethod
    def x0_from_prediction(self, latents: torch.Tensor, sigma: float, prediction: torch.Tensor) -> torch.Tensor:
        """The clean-sample estimate implied by a prediction."""

    @abstractmethod
    def euler_step(
        self, latents: torch.Tensor, sigma: float, sigma_next: float, prediction: torch.Tensor
    ) -> torch.Tensor:
        """One Euler step of the probability-flow ODE from `sigma` to `sigma_next`."""

    @abstractmethod
    def native_sigmas(self, num_steps: int, width: int, height: int) -> list[float]:
        """The sampling schedule of the family's pipeline (ending with 0), as its scheduler computes it."""

    @abstractmethod
    def released_sigmas(self, width: int, height: int) -> list[float]:
        """The training roll-out schedule of the authors' released script for this family (ending with 0)."""

    # Sampling with the unchanged pipeline, so samples are what users will get at inference.
    @torch.no_grad()
    def generate(
        self, conds: Sequence[Cond], *, seeds: Sequence[int], width: int, height: int, num_steps: int
    ) -> list[Image.Image]:
        """Images from the pipeline at its native few-step setting, one per (cond, seed) pair, cond-major.

        One pipeline call per image with a CPU generator: exactly what a user reproduces with diffusers.
        """
        return [
            self.generate_one(cond, generator=torch.Generator().manual_seed(seed), width=width, height=height,
                              num_steps=num_steps)
            for cond in conds
            for seed in seeds
        ]  # fmt: skip

    @abstractmethod
    def generate_one(
        self, cond: Cond, *, generator: torch.Generator, width: int, height: int, num_steps: int
    ) -> Image.Image:
        """One image from the family's own pipeline for `cond`."""

    @abstractmethod
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
        """One pipeline call with prompt strings: image `i` from `prompts[i]` and the noise of `generators[i]`.

        The call a diffusers user makes (`pipe(prompt=[...], generator=[...], ...)`), so guidance works the
        pipeline's way; the family adds its own fixed kwargs. `max_sequence_length`: what the pipeline pads or
        truncates a prompt to (`None`: the pipeline's default, 512). Whatever adapters are active are used.
        """

    def _text_encoder_on_device(self) -> None:
        """Puts the text encoder back on the device (training releases it to the CPU once features are cached); the
        teacher VLM stays where it is, rendering from prompts does not need it."""
        self.pipeline.text_encoder.to(self.device)

    def save_lora_weights(
        self, directory: str, state_dict: dict[str, torch.Tensor], adapter_metadata: dict[str, Any]
    ) -> None:
        """Writes `pytorch_lora_weights.safetensors` with the pipeline's own LoRA saver, so it loads it as is."""
        type(self.pipeline).save_lora_weights(
            directory, transformer_lora_layers=state_dict, transformer_lora_adapter_metadata=adapter_metadata
        )

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast on CUDA when the weights are bf16; a no-op in fp32."""
        if self.device.type == "cuda" and self.dtype == torch.bfloat16:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield

    @contextlib.contextmanager
    def lora_inputs_uncast(self) -> Iterator[None]:
        """For a block whose LoRA forwards all run under `autocast()`: peft does not copy each LoRA layer's bf16
        input to the fp32 of the LoRA weights (autocast runs those matmuls in bf16 anyway). 1.08x faster D-OPSD
        steps and 1.10x faster SFT steps for full-size Z-Image at 1024^2 on an H200 (`bench/gpu_zimage.py
        --only-batches`, docs/performance.md). A no-op in fp32."""
        if self.device.type == "cuda" and self.dtype == torch.bfloat16:
            with disable_input_dtype_casting(self.transformer):
                yield
        else:
            yield
