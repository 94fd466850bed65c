"""Model weights from the worker's own disk: `DOPSD_MODEL_PATHS` maps the model ids a job's config names (its
preset's base model and teacher encoder, hub ids such as `Tongyi-MAI/Z-Image-Turbo`) to mounted folders.

Applied where the worker turns a job's stored config into the config it runs with (training, previews and
generations alike), so the job row keeps the ids the user sees and only the worker's copy names folders. A
deployment's workers then never download and need no Hugging Face cache layout; every model a preset uses is one
folder as published (`hf download ID --local-dir FOLDER`), shared by every preset that names the same id.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from dopsd.config import DOPSDConfig
from dopsd.errors import ModelLoadError
from dopsd.models.loading import pipeline_folder_problems, vlm_folder_problems
from dopsd.presets import get_preset


def with_local_weights(config: DOPSDConfig, model_paths: Mapping[str, str]) -> DOPSDConfig:
    """`config` with its base model and teacher encoder ids replaced by the folders `model_paths` maps them to
    (ids it does not map are kept). Each mapped folder is checked before anything is loaded: one that does not
    exist or lacks files its model needs raises `ModelLoadError` naming the id, the folder and what is missing, so
    the job fails with `model_unavailable` at once instead of part-way through loading."""
    changes: dict[str, str] = {}
    base = config.pretrained_model_name_or_path
    if base in model_paths:
        changes["pretrained_model_name_or_path"] = _checked(base, model_paths[base], get_preset(config.preset).family)
    teacher = config.teacher_encoder_path
    if teacher is not None and teacher in model_paths:
        changes["teacher_encoder_path"] = _checked(teacher, model_paths[teacher], None)
    return config.with_changes(**changes) if changes else config


def _checked(model: str, folder: str, family: str | None) -> str:
    """`folder` once it holds `model` complete: a diffusers pipeline of `family`, or (`None`) a Qwen3-VL teacher."""
    role = "teacher encoder" if family is None else "base model"
    where = f"DOPSD_MODEL_PATHS maps the {role} {model} to {folder}"
    path = Path(folder)
    if not path.is_dir():
        raise ModelLoadError(f"{where}, which does not exist on this worker (is the model volume mounted?)")
    problems = vlm_folder_problems(path) if family is None else pipeline_folder_problems(path, family)
    if problems:
        raise ModelLoadError(f"{where}, which is incomplete: " + "; ".join(problems))
    return folder
