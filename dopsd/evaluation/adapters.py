"""Evaluating a finished adapter file: attach `pytorch_lora_weights.safetensors` to a loaded family as the student
adapter (what `measure` evaluates by default), and take it off again, leaving the base model as loaded."""

from __future__ import annotations

import warnings
from pathlib import Path

from dopsd.lora import STUDENT_ADAPTER
from dopsd.models.base import ModelFamily


def attach_adapter_file(family: ModelFamily, path: str | Path, adapter_name: str = STUDENT_ADAPTER) -> None:
    """Loads a diffusers-format LoRA file (the trainer's output) into the family's transformer as `adapter_name`,
    with its saved rank and alpha, through diffusers' own loader."""
    file = Path(path)
    with warnings.catch_warnings():  # peft warns on a second adapter; the base model stays reachable
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        family.transformer.load_lora_adapter(
            str(file.parent), weight_name=file.name, adapter_name=adapter_name, prefix="transformer"
        )
    family.transformer.set_adapter(adapter_name)


def detach_adapter(family: ModelFamily, adapter_name: str = STUDENT_ADAPTER) -> None:
    """Deletes the adapter from the family's transformer (the base model is left as it was loaded)."""
    if adapter_name in getattr(family.transformer, "peft_config", {}):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            family.transformer.delete_adapters([adapter_name])
