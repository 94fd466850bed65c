"""The verdict thresholds, each in its figure's own unit, chosen from measurements on the tiny presets
(`python bench/evaluation_cost.py --calibrate`; the measurements and the reasoning are in docs/evaluation.md).

A figure is judged on its bootstrap 95% interval over seeds: `degraded` (or `learned`) only when the whole interval
is past the threshold, `kept` only when the whole interval is inside the other one; anything between is
`inconclusive`. With a single seed (the quick in-training subset) the point value stands in for the interval.
Torch-free, so the service can show them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    """Where each figure turns from one verdict to another.

    drift_*: prior drift, the adapter-vs-base distance on prompts without the trigger, in units of the distance
        between two seeds of the base model (1.0 = the adapter moves an image as far as a new seed does).
    sharpness_*: |log| of the adapter/base ratio of the sharpness index (0.02 = 2% either way).
    consistency_*: log of the adapter/base ratio of the native-vs-finer-schedule distance (growth = the adapter's
        few-step trajectory breaks).
    concept_*: relative change of the held-out teacher-student gap: `learned` when the whole interval fell by more
        than `concept_learned`, `not learned` when the whole interval fell by less than `concept_not_learned`.
    visibility_min: the fail-fast gate: how far the reference moves the base model's first prediction, relative to
        how far a change of prompt moves it; below this the teacher is blind.
    calibrated_on: where the numbers were measured (they travel with every report).
    """

    drift_kept: float = 0.005
    drift_degraded: float = 0.01
    sharpness_kept: float = 0.015
    sharpness_degraded: float = 0.02
    consistency_kept: float = 0.2
    consistency_degraded: float = 0.5
    concept_learned: float = 0.15
    concept_not_learned: float = 0.05
    visibility_min: float = 0.05
    calibrated_on: str = "tiny-z-image, tiny-flux2-klein (random weights); re-measure on real weights"

    def to_dict(self) -> dict[str, float | str]:
        """The thresholds as a JSON-ready dict."""
        return dataclasses.asdict(self)


DEFAULT_THRESHOLDS = Thresholds()


Interval = tuple[float, float]


def _bounds(mean: float, ci: Interval | None) -> Interval:
    return ci if ci is not None else (mean, mean)


def one_sided(mean: float, ci: Interval | None, *, kept: float, degraded: float) -> str:
    """`degraded` when the interval lies above `degraded`, `kept` when it lies below `kept`, else `inconclusive`."""
    low, high = _bounds(mean, ci)
    if low > degraded:
        return "degraded"
    if high < kept:
        return "kept"
    return "inconclusive"


def two_sided(mean: float, ci: Interval | None, *, kept: float, degraded: float) -> str:
    """As `one_sided` on the figure's magnitude: a change in either direction past `degraded` degrades."""
    low, high = _bounds(mean, ci)
    if low > degraded or high < -degraded:
        return "degraded"
    if -kept < low and high < kept:
        return "kept"
    return "inconclusive"


def concept_verdict(mean: float, ci: Interval | None, thresholds: Thresholds) -> str:
    """`learned` when the gap's whole interval fell by more than `concept_learned`; `not learned` when the whole
    interval fell by less than `concept_not_learned` (or rose); else `inconclusive`."""
    low, high = _bounds(mean, ci)
    if high < -thresholds.concept_learned:
        return "learned"
    if low > -thresholds.concept_not_learned:
        return "not learned"
    return "inconclusive"


def direction(mean: float, ci: Interval | None) -> str:
    """For figures without a calibrated threshold (embedding similarities): `higher` / `lower` when the interval
    excludes zero, else `no clear change`."""
    low, high = _bounds(mean, ci)
    if ci is None:
        return "inconclusive"
    if low > 0:
        return "higher"
    if high < 0:
        return "lower"
    return "no clear change"
