"""Self-describing training checkpoints, written atomically, and the resume that reads them back.

A checkpoint folder `checkpoints/step-00000500/` holds both adapters, the optimizer state, the step, the data and
noise RNG states and the run's config, so a resumed run continues to the same result as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dopsd.config import DOPSDConfig
from dopsd.errors import CheckpointError


STATE_FILE = "trainer_state.json"
_COMPAT_FIELDS = ("preset", "rank", "lora_alpha", "teacher_mode", "train_batch_size", "gradient_accumulation_steps")


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs."""

    step: int
    data_rng: Any
    loss_history: list[float] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    state: TrainerState
    student: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    noise_rng: torch.Tensor
    torch_rng: torch.Tensor | None
    config: dict[str, Any]


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yields a temporary folder beside `final` that replaces `final` only if the block completes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def step_dir_name(step: int) -> str:
    """Zero-padded, so lexical order is numeric order."""
    return f"step-{step:08d}"


def save_checkpoint(
    root: Path,
    *,
    state: TrainerState,
    student: dict[str, torch.Tensor],
    teacher: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    noise_rng: torch.Generator,
    config: DOPSDConfig,
    keep: int,
) -> Path:
    """Writes a checkpoint under `root` (temp folder, then rename) and prunes all but the newest `keep`."""
    final = root / step_dir_name(state.step)
    with atomic_directory(final) as tmp:
        save_file(student, str(tmp / "student.safetensors"))
        if teacher is not None:
            save_file(teacher, str(tmp / "teacher.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        # The global torch RNG drives LoRA dropout; the noise generator drives the roll-outs.
        save_file(
            {"noise_rng": noise_rng.get_state(), "torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors")
        )
        (tmp / STATE_FILE).write_text(
            json.dumps(
                {
                    "step": state.step,
                    "data_rng": state.data_rng,
                    "loss_history": state.loss_history,
                    "metrics": state.metrics,
                }
            )
        )
        config.save(tmp / "config.json")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint of an output folder (`<out>/checkpoints/step-*`)."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    found = list_checkpoints(p / "checkpoints") or list_checkpoints(p)
    if not found:
        raise CheckpointError(f"no checkpoint found in {p}")
    return found[-1]


def load_checkpoint(path: str | Path, config: DOPSDConfig) -> Checkpoint:
    """Reads a checkpoint and refuses one written by an incompatible run (other preset, LoRA shape or batch)."""
    folder = find_checkpoint(path)
    try:
        raw = json.loads((folder / STATE_FILE).read_text())
        saved_config = json.loads((folder / "config.json").read_text())
        student = load_file(str(folder / "student.safetensors"))
        teacher_file = folder / "teacher.safetensors"
        teacher = load_file(str(teacher_file)) if teacher_file.exists() else None
        optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = load_file(str(folder / "rng.safetensors"))
        noise_rng, torch_rng = rng["noise_rng"], rng.get("torch_rng")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"unreadable checkpoint {folder}: {exc}") from exc
    mismatched = [
        f"{name} ({saved_config.get(name)!r} in checkpoint, {getattr(config, name)!r} now)"
        for name in _COMPAT_FIELDS
        if saved_config.get(name) != getattr(config, name)
    ]
    if mismatched:
        raise CheckpointError(f"checkpoint {folder} does not match this run: {', '.join(mismatched)}")
    state = TrainerState(
        step=int(raw["step"]),
        data_rng=raw["data_rng"],
        loss_history=list(raw.get("loss_history", [])),
        metrics=dict(raw.get("metrics", {})),
    )
    return Checkpoint(folder, state, student, teacher, optimizer, noise_rng, torch_rng, saved_config)


def random_state_to_json(rng: random.Random) -> Any:
    """`random.Random` state as JSON-ready lists."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def random_state_from_json(data: Any) -> tuple[Any, ...]:
    """Inverse of `random_state_to_json`, ready for `Random.setstate`."""
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
