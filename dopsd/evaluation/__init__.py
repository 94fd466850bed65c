"""Evidence for an adapter: whether it learned the concept and kept the model's few-step quality (a report with
paired per-seed figures, intervals, noise floors and verdicts), and the fail-fast gate on the teacher's view.

Call order in a job (docs/evaluation.md): `prepare_evaluation` while the encoders are loaded; `teacher_visibility`
before the first step; `measure_base` once; `measure(..., quick=True)` at each sample step; `measure` at the end.
`report`, `thresholds` and `stats` import without torch; the rest loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from dopsd.evaluation.adapters import attach_adapter_file, detach_adapter
    from dopsd.evaluation.embedding import Embedder, EmbedderError, ImageEmbedder, load_embedder
    from dopsd.evaluation.evaluate import BaseMeasurements, measure, measure_base
    from dopsd.evaluation.gate import BLIND_MESSAGE, VisibilityResult, teacher_visibility
    from dopsd.evaluation.inputs import EvaluationInputs, prepare_evaluation
    from dopsd.evaluation.prompts import EVAL_SEEDS, PRIOR_PROMPTS, prior_prompts_with
    from dopsd.evaluation.report import AxisVerdict, Figure, Report
    from dopsd.evaluation.selection import best_step
    from dopsd.evaluation.thresholds import DEFAULT_THRESHOLDS, Thresholds

_LAZY = {
    "attach_adapter_file": "dopsd.evaluation.adapters",
    "detach_adapter": "dopsd.evaluation.adapters",
    "Embedder": "dopsd.evaluation.embedding",
    "EmbedderError": "dopsd.evaluation.embedding",
    "ImageEmbedder": "dopsd.evaluation.embedding",
    "load_embedder": "dopsd.evaluation.embedding",
    "BLIND_MESSAGE": "dopsd.evaluation.gate",
    "VisibilityResult": "dopsd.evaluation.gate",
    "teacher_visibility": "dopsd.evaluation.gate",
    "EvaluationInputs": "dopsd.evaluation.inputs",
    "prepare_evaluation": "dopsd.evaluation.inputs",
    "BaseMeasurements": "dopsd.evaluation.evaluate",
    "measure": "dopsd.evaluation.evaluate",
    "measure_base": "dopsd.evaluation.evaluate",
    "EVAL_SEEDS": "dopsd.evaluation.prompts",
    "PRIOR_PROMPTS": "dopsd.evaluation.prompts",
    "prior_prompts_with": "dopsd.evaluation.prompts",
    "AxisVerdict": "dopsd.evaluation.report",
    "Figure": "dopsd.evaluation.report",
    "Report": "dopsd.evaluation.report",
    "best_step": "dopsd.evaluation.selection",
    "DEFAULT_THRESHOLDS": "dopsd.evaluation.thresholds",
    "Thresholds": "dopsd.evaluation.thresholds",
}

__all__ = [
    "BLIND_MESSAGE",
    "DEFAULT_THRESHOLDS",
    "EVAL_SEEDS",
    "PRIOR_PROMPTS",
    "AxisVerdict",
    "BaseMeasurements",
    "Embedder",
    "EmbedderError",
    "EvaluationInputs",
    "Figure",
    "ImageEmbedder",
    "Report",
    "Thresholds",
    "VisibilityResult",
    "attach_adapter_file",
    "best_step",
    "detach_adapter",
    "load_embedder",
    "measure",
    "measure_base",
    "prepare_evaluation",
    "prior_prompts_with",
    "teacher_visibility",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dopsd.evaluation' has no attribute {name!r}")
