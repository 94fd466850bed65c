"""Builds a `ModelFamily` for a preset: tiny models in code, or real weights from a local folder or hub id."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import ZImagePipeline
from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from dopsd.errors import ModelLoadError
from dopsd.models import tiny
from dopsd.models.base import ModelFamily
from dopsd.models.qwen_teacher import QwenVLTeacherEncoder, copy_text_encoder_into_vlm
from dopsd.models.z_image import ZImageFamily
from dopsd.presets import Preset


logger = logging.getLogger(__name__)

TINY_SEED = 0  # the tiny "weights" are a function of this seed only, never of the training seed
_VLM_PATCH = 16  # Qwen3-VL's patch size (the PIL processor's default of 14 is Qwen2-VL's)


def qwen_image_processor(source: str | None, min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if source is None:
        return Qwen2VLImageProcessorPil(
            patch_size=_VLM_PATCH, merge_size=2, temporal_patch_size=2, size=size, image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )  # fmt: skip
    return Qwen2VLImageProcessorPil.from_pretrained(source, size=size, patch_size=_VLM_PATCH)


def load_z_image_pipeline(base: str, *, dtype: torch.dtype) -> ZImagePipeline:
    """The base pipeline: built in code for `tiny://z-image`, else `from_pretrained` on a folder or hub id."""
    if base == "tiny://z-image":
        return tiny.build_tiny_z_image_pipeline(seed=TINY_SEED)
    try:
        return ZImagePipeline.from_pretrained(base, torch_dtype=dtype, local_files_only=Path(base).is_dir())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the Z-Image pipeline from {base!r}: {exc}") from exc


def load_family(
    preset: Preset,
    *,
    base: str,
    teacher: str | None,
    device: torch.device,
    dtype: torch.dtype,
    teacher_min_pixels: int,
    teacher_max_pixels: int,
) -> ModelFamily:
    """Loads the base pipeline and the teacher encoder of `preset` onto `device` in `dtype`."""
    if preset.family != "z_image":
        raise ModelLoadError(f"unknown model family {preset.family!r}")
    pipe = load_z_image_pipeline(base, dtype=dtype)
    return z_image_family(
        pipe,
        teacher,
        device=device,
        dtype=dtype,
        teacher_min_pixels=teacher_min_pixels,
        teacher_max_pixels=teacher_max_pixels,
    )


def z_image_family(
    pipe: ZImagePipeline,
    teacher: str | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    teacher_min_pixels: int,
    teacher_max_pixels: int,
) -> ZImageFamily:
    """Pairs a loaded Z-Image pipeline with its Qwen3-VL teacher encoder (`tiny://qwen3-vl`, a folder or hub id)."""
    if teacher is None:
        raise ModelLoadError("the Z-Image family needs a teacher encoder (a Qwen3-VL model)")
    if teacher == "tiny://qwen3-vl":
        torch.manual_seed(TINY_SEED + 10)
        vl_config = tiny.tiny_vlm_config(pipe.text_encoder.config, pipe.tokenizer)
        vlm = Qwen3VLForConditionalGeneration(vl_config).model
        processor = qwen_image_processor(None, teacher_min_pixels, teacher_max_pixels)
    else:
        try:
            full = Qwen3VLForConditionalGeneration.from_pretrained(
                teacher, torch_dtype=dtype, local_files_only=Path(teacher).is_dir()
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the teacher VLM from {teacher!r}: {exc}") from exc
        vlm = full.model  # the LM head is never used: features are hidden states
        processor = qwen_image_processor(teacher, teacher_min_pixels, teacher_max_pixels)
    copied = copy_text_encoder_into_vlm(pipe.text_encoder, vlm.language_model)
    logger.info("teacher encoder: copied %d text-encoder tensors into the VLM language model", copied)
    # Tiny models are built in fp32; real ones arrive in `dtype` from from_pretrained.
    vlm.to(device=device, dtype=dtype)
    pipe.to(device) if pipe.transformer.dtype == dtype else pipe.to(device=device, dtype=dtype)
    encoder = QwenVLTeacherEncoder(
        vlm, processor, pipe.tokenizer, chat_template_kwargs=ZImageFamily.chat_template_kwargs
    )
    return ZImageFamily(pipe, encoder, device=device, dtype=dtype)


def export_base_pipeline(preset: Preset, directory: str | Path) -> Path:
    """Writes a preset's base pipeline with `save_pretrained`, loadable by `ZImagePipeline.from_pretrained(dir)`."""
    if not preset.is_tiny:
        raise ModelLoadError(f"preset {preset.name!r} has real weights; export is for tiny presets built in code")
    pipe = load_z_image_pipeline(preset.base_model, dtype=torch.float32)
    out = Path(directory)
    pipe.save_pretrained(out)
    return out
