"""The evidence a run gathers about itself (docs/evaluation.md): the teacher gate before the first step, a quick
check at each sample step, and the final report of the adapter it keeps, against the base model on the same seeds.

The trainer calls `Evidence` at those points; the figures themselves live in `dopsd.evaluation`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from dopsd.callbacks import TrainerCallback
from dopsd.config import DOPSDConfig
from dopsd.data import ConceptDataset, resolve_caption
from dopsd.errors import TeacherBlind
from dopsd.evaluation.embedding import load_embedder
from dopsd.evaluation.evaluate import measure
from dopsd.evaluation.gate import VisibilityResult, teacher_visibility
from dopsd.evaluation.inputs import EvaluationInputs, prepare_evaluation
from dopsd.evaluation.prompts import EVAL_SEEDS, prior_prompts_with
from dopsd.evaluation.report import Report
from dopsd.evaluation.selection import best_step
from dopsd.models.base import ModelFamily
from dopsd.presets import get_preset


logger = logging.getLogger(__name__)

REPORT_NAME = "report.json"


class Evidence:
    """One run's gate, quick checks and report. Made while the encoders are loaded (it encodes its prompts then)."""

    def __init__(self, cfg: DOPSDConfig, family: ModelFamily, dataset: ConceptDataset) -> None:
        self.cfg, self.family = cfg, family
        seeds = [EVAL_SEEDS[0] + i for i in range(max(1, cfg.eval_seeds))]  # the gate needs one even without a report
        self.inputs: EvaluationInputs = prepare_evaluation(
            family,
            references=[(it.name, it.image) for it in dataset.items],
            concept_prompts=[resolve_caption(p, cfg.trigger) for p in cfg.validation_prompts],
            prior_prompts=prior_prompts_with(cfg.prior_prompts, cfg.trigger, get_preset(cfg.preset).prior_prompts),
            width=cfg.resolution,
            height=cfg.resolution,
            num_steps=cfg.sample_steps,
            text_max_length=cfg.student_max_sequence_length,
            context_max_length=cfg.teacher_max_sequence_length,
            seeds=seeds,
        )
        self.quick_reports: list[Report] = []
        self.best_state: tuple[int, dict[str, torch.Tensor]] | None = None
        self.teacher_check: VisibilityResult | None = None

    @property
    def reports(self) -> bool:
        """Whether the run evaluates its adapter (`eval_seeds` > 0)."""
        return self.cfg.eval_seeds > 0

    def check_teacher(self, callbacks: Sequence[TrainerCallback]) -> VisibilityResult:
        """The gate, on the base model: raises `TeacherBlind` (before any step) when the teacher cannot see the
        concept, unless the config says `force`."""
        result = teacher_visibility(self.family, self.inputs)
        self.teacher_check = result
        logger.info("%s", result.render_text())
        for cb in callbacks:
            cb.on_teacher_check(result)
        if result.blind and not self.cfg.force:
            raise TeacherBlind(result.message or "the teacher cannot see the concept", result.to_dict())
        return result

    def quick_check(self, step: int, student: dict[str, torch.Tensor], callbacks: Sequence[TrainerCallback]) -> None:
        """A cheap subset of the report at a sample step; with `keep: best`, remembers the student of the best
        step so far."""
        if not self.reports:
            return
        report = measure(self.family, self.inputs, quick=True, step=step)
        self.quick_reports.append(report)
        for cb in callbacks:
            cb.on_evaluation(report)
        if self.cfg.keep == "best" and best_step(self.quick_reports) == step:
            self.best_state = (step, {k: v.detach().to("cpu", copy=True) for k, v in student.items()})

    def kept_state(self, final_report: Report | None) -> tuple[int, dict[str, torch.Tensor]] | None:
        """With `keep: best`: the earlier step's student when its quick check beats the final adapter's report."""
        if self.cfg.keep != "best" or self.best_state is None or final_report is None:
            return None
        step = best_step([*self.quick_reports, final_report])
        return self.best_state if step == self.best_state[0] else None

    def final_report(self, out: Path, step: int) -> Report | None:
        """The full report of the adapter as it is now, written to `report.json` (the trainer tells the callbacks
        once it knows which adapter it keeps)."""
        if not self.reports:
            return None
        folder = self.cfg.eval_embedding_model or get_preset(self.cfg.preset).embedding_model
        embedder = load_embedder(folder, device=self.family.device) if folder else None
        report = measure(self.family, self.inputs, embedder=embedder, step=step)
        data = report.to_dict()
        if self.teacher_check is not None:
            data["teacher_check"] = self.teacher_check.to_dict()
        (out / REPORT_NAME).write_text(json.dumps(data, indent=2) + "\n")
        return report
