"""What a finished run leaves in its output folder: the adapter files, `config.json` and `metrics.json`.

The trainer writes the diffusers adapter first, before anything that can still fail (the report, the final samples,
the conversion to other formats), so a failure after training never loses the trained weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dopsd import __version__
from dopsd.config import DOPSDConfig
from dopsd.lora import LORA_WEIGHT_NAME, add_file_metadata
from dopsd.lora_formats import COMFYUI_WEIGHT_NAME, write_comfyui_lora
from dopsd.models.base import ModelFamily


METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
TRANSFORMER_FOLDER = "transformer"  # a full fine-tune's weights, in diffusers' format


def write_adapter(
    out: Path,
    family: ModelFamily,
    student: dict[str, torch.Tensor],
    lora_metadata: dict[str, Any],
    cfg: DOPSDConfig,
    steps: int,
) -> Path:
    """Writes `pytorch_lora_weights.safetensors` (the pipeline's own LoRA saver, so diffusers loads it as is) with
    our header metadata (method, version, base model, trigger, rank, alpha, steps), and the run's `config.json`.

    The file is written in a scratch folder and moved into place whole, so replacing an adapter (`keep: best`)
    never leaves a half-written one where the last good one was."""
    path = out / LORA_WEIGHT_NAME
    with tempfile.TemporaryDirectory(prefix=".adapter-", dir=out) as scratch:
        family.save_lora_weights(scratch, student, lora_metadata)
        _add_metadata(Path(scratch) / LORA_WEIGHT_NAME, family, cfg, steps, lora_metadata)
        os.replace(Path(scratch) / LORA_WEIGHT_NAME, path)
    cfg.save(out / CONFIG_FILE)
    return path


def write_transformer(out: Path, transformer: torch.nn.Module, base: Mapping[str, torch.Tensor]) -> Path:
    """Writes a fully fine-tuned transformer to `out/transformer/` with diffusers' `save_pretrained` (so
    `<Model>.from_pretrained(out, subfolder="transformer")` loads it, or a pipeline takes it in place of its own),
    each weight in its base's dtype (bf16 on a GPU, not the fp32 master copy). Written whole in a scratch folder
    first, so a folder in place is always complete."""
    from dopsd.full_weights import weights_in_place

    target = out / TRANSFORMER_FOLDER
    cast = {name: p.detach().to(base[name].dtype) for name, p in transformer.named_parameters()}
    scratch = Path(tempfile.mkdtemp(prefix=".transformer-", dir=out))
    try:
        with weights_in_place(transformer, cast):
            transformer.save_pretrained(scratch, safe_serialization=True)  # type: ignore[operator]
        shutil.rmtree(target, ignore_errors=True)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _add_metadata(
    path: Path, family: ModelFamily, cfg: DOPSDConfig, steps: int, lora_metadata: Mapping[str, Any]
) -> None:
    add_file_metadata(
        path,
        {
            "dopsd.method": "D-OPSD (arXiv 2605.05204)",
            "dopsd.version": __version__,
            "dopsd.base_model": str(cfg.pretrained_model_name_or_path),
            "dopsd.preset": cfg.preset,
            "dopsd.family": family.name,
            "dopsd.trigger": cfg.trigger,
            "dopsd.rank": str(lora_metadata.get("r", cfg.rank)),
            "dopsd.alpha": str(lora_metadata.get("lora_alpha", cfg.lora_alpha)),
            "dopsd.steps": str(steps),
            "dopsd.finetune": cfg.finetune,
        },
    )


def write_other_formats(adapter_path: Path, cfg: DOPSDConfig, family: ModelFamily) -> list[Path]:
    """The adapter in the other `output_formats` (ComfyUI's key names), converted from the diffusers file."""
    written = []
    if "comfyui" in cfg.output_formats:
        target = adapter_path.parent / COMFYUI_WEIGHT_NAME
        write_comfyui_lora(adapter_path, target, family.name)
        written.append(target)
    return written


def run_metrics(
    *,
    steps: int,
    loss: Sequence[float],
    grad_norm: Sequence[float | None],
    gap_before: float | None,
    gap_after: float | None,
    gap_definition: str,
    timing_s: Mapping[str, float],
    captions: Mapping[str, Sequence[str]],
    samples: Sequence[str],
) -> dict[str, Any]:
    """The content of `metrics.json`: per-step loss and gradient norm (before clipping), the teacher-student gap
    before and after, timings, the images and captions trained on, and the final samples."""
    relative = (gap_after - gap_before) / gap_before if gap_before and gap_after is not None else None
    return {
        "steps": steps,
        "loss": list(loss),
        "grad_norm": list(grad_norm),
        "final_loss": loss[-1] if loss else None,
        "teacher_student_gap": {
            "before": gap_before,
            "after": gap_after,
            "relative_change": relative,
            "definition": gap_definition,
        },
        "timing_s": dict(timing_s),
        "images": list(captions),
        "captions": {name: list(caps) for name, caps in captions.items()},
        "samples": list(samples),
    }


def write_metrics(out: Path, metrics: Mapping[str, Any]) -> Path:
    """Writes `metrics.json`."""
    path = out / METRICS_FILE
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path
