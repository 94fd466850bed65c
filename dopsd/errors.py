"""Typed errors the trainer and the generation engine raise, so callers (the CLI, the worker) can react without
parsing messages."""

from __future__ import annotations


class TrainingCancelled(Exception):
    """Raised when a callback asked the trainer to stop; `step` is the last completed optimizer step."""

    def __init__(self, step: int, checkpoint_dir: str | None = None) -> None:
        super().__init__(f"training cancelled after step {step}")
        self.step = step
        self.checkpoint_dir = checkpoint_dir


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match the run that tries to resume from it."""


class ModelLoadError(ValueError):
    """Base weights or the teacher encoder could not be loaded or do not fit together."""


class TeacherBlind(ValueError):
    """The teacher gate found that the model cannot see the concept in its reference images, before any step was
    paid for (`figures`: what it measured). `force` in the config trains anyway."""

    def __init__(self, message: str, figures: dict[str, object]) -> None:
        super().__init__(message)
        self.message = message
        self.figures = figures


class GenerationCancelled(Exception):
    """Raised between pipeline calls when `should_stop` asked a generation to stop; `images_done` images were
    rendered before it (and are discarded: a generation succeeds whole or not at all)."""

    def __init__(self, images_done: int) -> None:
        super().__init__(f"generation cancelled after {images_done} images")
        self.images_done = images_done
