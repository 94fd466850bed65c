"""Builds a `ModelFamily` for a preset: tiny models in code, or real weights from a local folder or hub id."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import Flux2KleinPipeline, ZImagePipeline
from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from dopsd.config import DOPSDConfig
from dopsd.errors import ModelLoadError
from dopsd.models import tiny
from dopsd.models.base import ModelFamily
from dopsd.models.flux2_klein import Flux2KleinFamily
from dopsd.models.qwen_teacher import QwenVLTeacherEncoder, copy_text_encoder_into_vlm
from dopsd.models.z_image import ZImageFamily
from dopsd.presets import Preset, get_preset


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


_PIPELINES: dict[str, tuple[str, Any, Any]] = {
    # family: (tiny base id, pipeline class, tiny builder)
    "z_image": ("tiny://z-image", ZImagePipeline, tiny.build_tiny_z_image_pipeline),
    "flux2_klein": ("tiny://flux2-klein", Flux2KleinPipeline, tiny.build_tiny_flux2_klein_pipeline),
}


def load_pipeline(family: str, base: str, *, dtype: torch.dtype) -> Any:
    """The base pipeline: built in code for a `tiny://` id, else `from_pretrained` on a folder or hub id."""
    if family not in _PIPELINES:
        raise ModelLoadError(f"unknown model family {family!r}")
    tiny_id, pipeline_class, build_tiny = _PIPELINES[family]
    if base == tiny_id:
        return build_tiny(seed=TINY_SEED)
    try:
        return pipeline_class.from_pretrained(base, torch_dtype=dtype, local_files_only=Path(base).is_dir())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the {pipeline_class.__name__} from {base!r}: {exc}") from exc


def load_family_for(config: DOPSDConfig, *, device: torch.device, dtype: torch.dtype) -> ModelFamily:
    """The family a config trains: its preset, base weights, teacher encoder and teacher context."""
    return load_family(
        get_preset(config.preset),
        base=config.pretrained_model_name_or_path,
        teacher=config.teacher_encoder_path,
        device=device,
        dtype=dtype,
        teacher_min_pixels=config.teacher_min_pixels,
        teacher_max_pixels=config.teacher_max_pixels,
        teacher_context=config.teacher_context,
    )


def load_family(
    preset: Preset,
    *,
    base: str,
    teacher: str | None,
    device: torch.device,
    dtype: torch.dtype,
    teacher_min_pixels: int,
    teacher_max_pixels: int,
    teacher_context: str = "vlm",
) -> ModelFamily:
    """Loads the base pipeline and the teacher context of `preset` onto `device` in `dtype`."""
    pipe = load_pipeline(preset.family, base, dtype=dtype)
    if preset.family == "flux2_klein":
        return flux2_klein_family(
            pipe,
            teacher if teacher_context == "vlm" else None,
            teacher_context=teacher_context,
            text_layers=preset.text_encoder_layers,
            device=device,
            dtype=dtype,
            teacher_min_pixels=teacher_min_pixels,
            teacher_max_pixels=teacher_max_pixels,
        )
    return z_image_family(
        pipe,
        teacher,
        device=device,
        dtype=dtype,
        teacher_min_pixels=teacher_min_pixels,
        teacher_max_pixels=teacher_max_pixels,
    )


def _move(pipe: Any, device: torch.device, dtype: torch.dtype) -> None:
    # Tiny models are built in fp32; real ones arrive in `dtype` from from_pretrained.
    if pipe.transformer.dtype == dtype:
        pipe.to(device)
    else:
        pipe.to(device=device, dtype=dtype)


def build_teacher_encoder(
    pipe: Any,
    teacher: str,
    *,
    chat_template_kwargs: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    teacher_min_pixels: int,
    teacher_max_pixels: int,
) -> QwenVLTeacherEncoder:
    """Qwen3-VL (`tiny://qwen3-vl`, a folder or hub id) with its language model overwritten by `pipe`'s text
    encoder, tokenizing with `pipe`'s tokenizer and chat template."""
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
    vlm.to(device=device, dtype=dtype)
    return QwenVLTeacherEncoder(vlm, processor, pipe.tokenizer, chat_template_kwargs=chat_template_kwargs)


def z_image_family(
    pipe: ZImagePipeline,
    teacher: str | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    teacher_min_pixels: int,
    teacher_max_pixels: int,
) -> ZImageFamily:
    """Pairs a loaded Z-Image pipeline with its Qwen3-VL teacher encoder."""
    if teacher is None:
        raise ModelLoadError("the Z-Image family needs a teacher encoder (a Qwen3-VL model)")
    encoder = build_teacher_encoder(
        pipe,
        teacher,
        chat_template_kwargs=ZImageFamily.chat_template_kwargs,
        device=device,
        dtype=dtype,
        teacher_min_pixels=teacher_min_pixels,
        teacher_max_pixels=teacher_max_pixels,
    )
    _move(pipe, device, dtype)
    return ZImageFamily(pipe, encoder, device=device, dtype=dtype)


def flux2_klein_family(
    pipe: Flux2KleinPipeline,
    teacher: str | None,
    *,
    teacher_context: str,
    text_layers: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    teacher_min_pixels: int,
    teacher_max_pixels: int,
) -> Flux2KleinFamily:
    """A loaded FLUX.2-klein pipeline with its edit-branch teacher, or a Qwen3-VL one for `vlm`."""
    encoder = None
    if teacher_context == "vlm":
        if teacher is None:
            raise ModelLoadError("the `vlm` teacher context needs a teacher encoder (a Qwen3-VL model)")
        encoder = build_teacher_encoder(
            pipe,
            teacher,
            chat_template_kwargs=Flux2KleinFamily.chat_template_kwargs,
            device=device,
            dtype=dtype,
            teacher_min_pixels=teacher_min_pixels,
            teacher_max_pixels=teacher_max_pixels,
        )
    _move(pipe, device, dtype)
    return Flux2KleinFamily(
        pipe,
        text_layers=text_layers,
        teacher_context=teacher_context,
        teacher_encoder=encoder,
        device=device,
        dtype=dtype,
    )


def export_base_pipeline(preset: Preset, directory: str | Path) -> Path:
    """Writes a tiny preset's base pipeline with `save_pretrained`, loadable by its pipeline's `from_pretrained`."""
    if not preset.is_tiny:
        raise ModelLoadError(f"preset {preset.name!r} has real weights; export is for tiny presets built in code")
    pipe = load_pipeline(preset.family, preset.base_model, dtype=torch.float32)
    out = Path(directory)
    pipe.save_pretrained(out)
    return out
