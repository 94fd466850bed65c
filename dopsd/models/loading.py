"""Builds a `ModelFamily` for a preset: tiny models in code, or real weights from a local folder or hub id."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import Flux2KleinPipeline, ZImagePipeline
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
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
TINY_TEACHER = "tiny://qwen3-vl"
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
    """The base pipeline: built in code for a `tiny://` id, else `from_pretrained` on a folder or hub id. A folder
    is checked first (`pipeline_folder_problems`), so an incomplete one fails naming what it lacks."""
    if family not in _PIPELINES:
        raise ModelLoadError(f"unknown model family {family!r}")
    tiny_id, pipeline_class, build_tiny = _PIPELINES[family]
    if base == tiny_id:
        return build_tiny(seed=TINY_SEED)
    local = _local_folder(base)
    if local is not None:
        _refuse_incomplete(local, pipeline_folder_problems(local, family), f"a {pipeline_class.__name__}")
    try:
        return pipeline_class.from_pretrained(base, dtype=dtype, local_files_only=local is not None)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the {pipeline_class.__name__} from {base!r}: {exc}") from exc


def _local_folder(source: str) -> Path | None:
    """`source` as a local folder, or None for a hub id. A path (absolute, or starting with `.` or `~`) that is no
    folder is an error here, not a hub id that fails later with a message about repository names."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if source.startswith(("/", ".", "~")):
        raise ModelLoadError(f"the model folder {source} does not exist")
    return None


def _refuse_incomplete(folder: Path, problems: list[str], what: str) -> None:
    if problems:
        raise ModelLoadError(f"the folder {folder} is not {what}: " + "; ".join(problems))


def _weights_problems(folder: Path, prefix: str = "") -> list[str]:
    """What a model folder (a `config.json` and its weights) lacks: the config, the weights, or any shard its index
    lists. `prefix` is the folder as messages name it inside the model folder (`transformer/`, or nothing)."""
    problems = [] if (folder / "config.json").is_file() else [f"no {prefix}config.json"]
    indexes = sorted(folder.glob("*.safetensors.index.json")) + sorted(folder.glob("*.bin.index.json"))
    if indexes:
        try:
            shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return [*problems, f"{prefix}{indexes[0].name} is not a readable weight index"]
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            listed = ", ".join(prefix + name for name in missing[:3]) + (", ..." if len(missing) > 3 else "")
            problems.append(f"{len(missing)} of {len(shards)} weight shards missing ({listed})")
    elif not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        problems.append(f"no weights ({prefix}*.safetensors)")
    return problems


def pipeline_folder_problems(folder: Path, family: str) -> list[str]:
    """What a local folder lacks to load as `family`'s diffusers pipeline (empty when nothing is missing): its
    `model_index.json`, every component the pipeline class requires, each model component's `config.json` and its
    weights (every shard of a sharded one), the scheduler's and the tokenizer's configs. Checks files, loads
    nothing, so a worker can refuse a half-copied folder before a job pays for loading it."""
    _, pipeline_class, _ = _PIPELINES[family]
    index = folder / "model_index.json"
    if not index.is_file():
        return ["no model_index.json (not a diffusers pipeline folder)"]
    try:
        declared = json.loads(index.read_text())
    except ValueError:
        return ["model_index.json is not valid JSON"]
    problems: list[str] = []
    required, _ = pipeline_class._get_signature_keys(pipeline_class)
    for name in sorted(required):
        entry = declared.get(name) if isinstance(declared, dict) else None
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            problems.append(f"model_index.json declares no `{name}`")
            continue
        component, class_name = folder / name, str(entry[1])
        if not component.is_dir():
            problems.append(f"no {name}/ folder")
        elif class_name.endswith("Scheduler"):
            if not (component / "scheduler_config.json").is_file():
                problems.append(f"no {name}/scheduler_config.json")
        elif "Tokenizer" in class_name:
            if not _has_tokenizer(component):
                problems.append(f"no {name}/tokenizer_config.json or {name}/tokenizer.json")
        else:
            problems += _weights_problems(component, f"{name}/")
    return problems


def vlm_folder_problems(folder: Path) -> list[str]:
    """What a local folder lacks to serve as the teacher encoder (empty when nothing is missing): a Qwen3-VL
    `config.json` and its weights (for the teacher's vision tower), `preprocessor_config.json` (its image
    processor) and its tokenizer (for the captions it writes for uncaptioned images)."""
    problems = _weights_problems(folder)
    config = folder / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (ValueError, AttributeError):
            model_type = "unreadable"
        if model_type != Qwen3VLConfig.model_type:
            problems.append(f"config.json is a {model_type!r} model, not {Qwen3VLConfig.model_type!r} (Qwen3-VL)")
    if not (folder / "preprocessor_config.json").is_file():
        problems.append("no preprocessor_config.json")
    if not _has_tokenizer(folder):
        problems.append("no tokenizer_config.json or tokenizer.json")
    return problems


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


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
    if preset.family == "shapes":  # a committed pixel-space model: no VAE, no text model, the edit teacher
        from dopsd.models.shapes import shapes_family

        try:
            return shapes_family(base, device=device, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the shapes model from {base!r}: {exc}") from exc
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
    if teacher == TINY_TEACHER:
        vlm = tiny_teacher_vlm(pipe).model
        processor = qwen_image_processor(None, teacher_min_pixels, teacher_max_pixels)
    else:
        local = _local_folder(teacher)
        if local is not None:
            _refuse_incomplete(local, vlm_folder_problems(local), "a Qwen3-VL teacher encoder")
        try:
            full = Qwen3VLForConditionalGeneration.from_pretrained(
                teacher, dtype=dtype, local_files_only=local is not None
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


def tiny_teacher_vlm(pipe: Any) -> Qwen3VLForConditionalGeneration:
    """The tiny Qwen3-VL (`tiny://qwen3-vl`) of a pipeline: its language model shaped exactly like `pipe`'s text
    encoder (so that encoder's weights can be copied in), the rest random from a fixed seed."""
    torch.manual_seed(TINY_SEED + 10)
    return Qwen3VLForConditionalGeneration(tiny.tiny_vlm_config(pipe.text_encoder.config, pipe.tokenizer))


def export_base_pipeline(
    preset: Preset,
    directory: str | Path,
    *,
    teacher_directory: str | Path | None = None,
    max_shard_size: str | None = None,
) -> Path:
    """Writes a tiny preset's base pipeline with `save_pretrained`, loadable by its pipeline's `from_pretrained`,
    and, given `teacher_directory`, its tiny teacher VLM as `export_teacher_encoder` writes it: together the
    folders a real preset's weights come in, so a real preset's loading can be pointed at them. `max_shard_size`
    (e.g. "200KB") splits the weights into shards with an index, as the large real checkpoints are."""
    if not preset.is_tiny:
        raise ModelLoadError(f"preset {preset.name!r} has real weights; export is for tiny presets built in code")
    pipe = load_pipeline(preset.family, preset.base_model, dtype=torch.float32)
    out = Path(directory)
    pipe.save_pretrained(out, max_shard_size=max_shard_size)
    if teacher_directory is not None:
        export_teacher_encoder(pipe, teacher_directory, max_shard_size=max_shard_size)
    return out


def export_teacher_encoder(pipe: Any, directory: str | Path, *, max_shard_size: str | None = None) -> Path:
    """Writes the tiny teacher VLM of `pipe` (`tiny_teacher_vlm`) as a Qwen3-VL model folder is published: the model
    (`config.json`, weights), its image processor (`preprocessor_config.json`) and the tokenizer, so that
    `build_teacher_encoder` and the captioner load it as they load Qwen3-VL-4B-Instruct, and get the weights the
    `tiny://qwen3-vl` teacher is built with."""
    out = Path(directory)
    vlm = tiny_teacher_vlm(pipe)
    if max_shard_size is None:
        vlm.save_pretrained(out)
    else:
        vlm.save_pretrained(out, max_shard_size=max_shard_size)
    defaults = get_preset("tiny-z-image").defaults
    qwen_image_processor(None, defaults["teacher_min_pixels"], defaults["teacher_max_pixels"]).save_pretrained(out)
    pipe.tokenizer.save_pretrained(out)
    return out
