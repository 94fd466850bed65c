"""How the trainer reports progress and takes orders: step states in, a `TrainerControl` back.

The worker implements these to write progress to the database and to poll for cancellation; the CLI draws a
progress bar. The trainer knows nothing about either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from dopsd.evaluation.gate import VisibilityResult
    from dopsd.evaluation.report import Report
    from dopsd.sampling import SampleSet


@dataclass(frozen=True)
class StepState:
    """What the trainer knows after an optimizer step."""

    step: int
    total_steps: int
    loss: float
    learning_rate: float
    elapsed_s: float
    eta_s: float
    grad_norm: float | None = None  # of the student's gradient, before clipping (None where not measured)


@dataclass
class TrainerControl:
    """A callback's answer: stop now (the trainer raises `TrainingCancelled`) and/or checkpoint now."""

    should_stop: bool = False
    should_save: bool = False


class TrainerCallback:
    """Base class with no-op hooks; override the ones you need."""

    def on_train_begin(self, total_steps: int, start_step: int) -> None:
        """Called once the models are ready, before the first step (`start_step` > 0 when resuming)."""

    def on_step_end(self, state: StepState) -> TrainerControl | None:
        """Called after every optimizer step; return a `TrainerControl` to stop or checkpoint."""
        return None

    def on_checkpoint(self, step: int, path: Path) -> None:
        """Called after a checkpoint was written (atomically) to `path`."""

    def on_samples(self, samples: SampleSet) -> None:
        """Called after the sample images of a step were written (`samples.final` for the last ones)."""

    def on_teacher_check(self, result: VisibilityResult) -> None:
        """Called once the teacher gate measured, before the first step, whether the teacher sees the concept."""

    def on_evaluation(self, report: Report) -> None:
        """Called after an evaluation: a quick check at a sample step (`report.quick`), or the final report."""

    def on_train_end(self, output_dir: Path) -> None:
        """Called after the adapter, config and metrics were written."""
