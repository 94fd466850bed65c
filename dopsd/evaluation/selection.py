"""Choosing the adapter of the best evaluated step (a spec option keeps it instead of the last one)."""

from __future__ import annotations

from collections.abc import Sequence

from dopsd.evaluation.report import Report


def best_step(reports: Sequence[Report]) -> int | None:
    """The step whose report shows the lowest held-out teacher-student gap among those whose few-step quality is
    not `degraded` (the concept learned furthest without breaking the model); `None` when every evaluated step is
    degraded or none carries a step number. Ties go to the earlier step."""
    best: tuple[float, int] | None = None
    for report in reports:
        gap = report.figures["concept_gap"].adapter
        if report.step is None or gap is None or report.few_step_quality.verdict == "degraded":
            continue
        if best is None or (gap, report.step) < best:
            best = (gap, report.step)
    return best[1] if best is not None else None
