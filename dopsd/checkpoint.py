"""Self-describing training checkpoints, written atomically, and the resume that reads them back.

A checkpoint folder `checkpoints/step-00000500/` holds both adapters, the optimizer state, the step, the data and
noise RNG states, the run's config and its training fingerprint (the settings that shape what is learned, plus a
digest of the images and captions), so a resumed run continues to the same result as an uninterrupted one and a
resume with other settings or other data is refused instead of silently mixing two runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dopsd.config import DOPSDConfig
from dopsd.data import ConceptDataset
from dopsd.errors import CheckpointError


logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
FINGERPRINT_FILE = "fingerprint.json"
# The resolved config fields that change what a run learns: a resume must keep every one. Paths (the worker gives
# each attempt a new temporary folder), step counts (a resume may extend a run), sampling and checkpoint cadence are
# not among them; the trigger, captions and images enter through the dataset digest. The batch enters as the global
# batch (processes x batch x accumulation, `global_batch_of`): a run may resume on another number of processes.
TRAINING_FIELDS = (
    "preset",
    "finetune",
    "learning_rate",
    "loss_space",
    "rollout_schedule",
    "teacher_mode",
    "teacher_context",
    "ema_decay",
    "rank",
    "lora_alpha",
    "lora_dropout",
    "global_batch_size",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "adam_weight_decay",
    "max_grad_norm",
    "resolution",
    "sample_steps",
    "student_max_sequence_length",
    "teacher_max_sequence_length",
    "teacher_min_pixels",
    "teacher_max_pixels",
)
DATASET_KEY = "dataset"
# What a fingerprint written before a field existed meant by its absence.
ABSENT_MEANS = {"finetune": "lora"}


def dataset_digest(dataset: ConceptDataset) -> str:
    """SHA-256 over every training image (name, mode, size, decoded pixels) and its resolved captions, in order.

    Pixels rather than file bytes, so a dataset re-validated from the same upload hashes alike however it was read.
    """
    digest = hashlib.sha256()
    for item in dataset.items:
        header = json.dumps([item.name, item.image.mode, item.image.size, list(item.captions)])
        digest.update(header.encode())
        digest.update(item.image.tobytes())
    return digest.hexdigest()


def training_fingerprint(config: Mapping[str, Any], dataset_sha256: str | None) -> dict[str, Any]:
    """The training-relevant fields of a resolved config (`DOPSDConfig.to_dict()`) plus the dataset digest.

    A field the config does not have is recorded as `None`; `dataset_sha256` is `None` where no digest is known.
    """
    fingerprint = {name: config.get(name) for name in TRAINING_FIELDS}
    fingerprint["global_batch_size"] = global_batch_of(config)
    fingerprint[DATASET_KEY] = dataset_sha256
    return fingerprint


def global_batch_of(values: Mapping[str, Any]) -> int | None:
    """Samples per optimizer step of a config (or of a fingerprint written before the global batch was one of its
    fields): `num_processes` (1 before it existed) x `train_batch_size` x `gradient_accumulation_steps`."""
    if values.get("global_batch_size") is not None:
        return int(values["global_batch_size"])
    if values.get("train_batch_size") is None or values.get("gradient_accumulation_steps") is None:
        return None
    processes = int(values.get("num_processes") or 1)
    return processes * int(values["train_batch_size"]) * int(values["gradient_accumulation_steps"])


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`field (X in checkpoint, Y now)` for every fingerprint field that differs; the dataset digest abbreviated."""
    out = []
    for name in (*TRAINING_FIELDS, DATASET_KEY):
        before, now = saved.get(name, ABSENT_MEANS.get(name)), current.get(name)
        if before == now:
            continue
        if name == DATASET_KEY:
            out.append(f"dataset (images or captions differ: {str(before)[:12]} in checkpoint, {str(now)[:12]} now)")
        else:
            out.append(f"{name} ({before!r} in checkpoint, {now!r} now)")
    return out


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs."""

    step: int
    data_rng: Any
    loss_history: list[float] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    grad_norm_history: list[float | None] = field(default_factory=list)  # before clipping; None: not recorded


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
    optimizer: torch.optim.Optimizer | Mapping[str, Any],
    noise_rng: torch.Generator,
    config: DOPSDConfig,
    keep: int,
    dataset_sha256: str | None = None,
) -> Path:
    """Writes a checkpoint under `root` (temp folder, then rename) and prunes all but the newest `keep`.

    The checkpoint's fingerprint (`training_fingerprint(config, dataset_sha256)`) goes to `fingerprint.json`; pass
    the run's `dataset_digest` so a resume can check the data too.
    """
    final = root / step_dir_name(state.step)
    with atomic_directory(final) as tmp:
        save_file(student, str(tmp / "student.safetensors"))
        if teacher is not None:
            save_file(teacher, str(tmp / "teacher.safetensors"))
        # The optimizer, or its state (a full fine-tune's, gathered by parameter name).
        torch.save(dict(optimizer) if isinstance(optimizer, Mapping) else optimizer.state_dict(), tmp / "optimizer.pt")
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
                    "grad_norm_history": state.grad_norm_history,
                    "metrics": state.metrics,
                }
            )
        )
        config.save(tmp / "config.json")
        fingerprint = training_fingerprint(config.to_dict(), dataset_sha256)
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
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


def load_checkpoint(path: str | Path, config: DOPSDConfig, dataset_sha256: str | None = None) -> Checkpoint:
    """Reads a checkpoint and refuses one whose training fingerprint differs from this run's.

    Every field of `TRAINING_FIELDS` and the dataset digest must match; a `CheckpointError` names each one that
    differs. A checkpoint written before fingerprints existed is still checked field by field against its saved
    `config.json`; only its data cannot be checked, which is logged as a warning (refusing it would fail every job
    in flight across the upgrade that introduced fingerprints). Where either side has no dataset digest, the
    data is not compared. The batch is compared as the global batch, so a run resumes on another number of
    processes with the same global batch; an older fingerprint's is its batch x accumulation (one process).
    """
    folder = find_checkpoint(path)
    try:
        raw = json.loads((folder / STATE_FILE).read_text())
        saved_config = json.loads((folder / "config.json").read_text())
        fingerprint_file = folder / FINGERPRINT_FILE
        saved_fingerprint = json.loads(fingerprint_file.read_text()) if fingerprint_file.exists() else None
        student = load_file(str(folder / "student.safetensors"))
        teacher_file = folder / "teacher.safetensors"
        teacher = load_file(str(teacher_file)) if teacher_file.exists() else None
        optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = load_file(str(folder / "rng.safetensors"))
        noise_rng, torch_rng = rng["noise_rng"], rng.get("torch_rng")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"unreadable checkpoint {folder}: {exc}") from exc
    if saved_fingerprint is None:
        saved_fingerprint = training_fingerprint(saved_config, None)
        logger.warning(
            "checkpoint %s has no training fingerprint (older version): its dataset is not verified", folder
        )
    saved_fingerprint = {**saved_fingerprint, "global_batch_size": global_batch_of(saved_fingerprint)}
    current = training_fingerprint(config.to_dict(), dataset_sha256)
    if saved_fingerprint.get(DATASET_KEY) is None or current[DATASET_KEY] is None:
        current[DATASET_KEY] = saved_fingerprint.get(DATASET_KEY)
    mismatched = fingerprint_differences(saved_fingerprint, current)
    if mismatched:
        raise CheckpointError(f"checkpoint {folder} does not match this run: {', '.join(mismatched)}")
    state = TrainerState(
        step=int(raw["step"]),
        data_rng=raw["data_rng"],
        loss_history=list(raw.get("loss_history", [])),
        # A checkpoint of an older version has no gradient norms: `None` for each of its steps.
        grad_norm_history=list(raw.get("grad_norm_history", [None] * len(raw.get("loss_history", [])))),
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
