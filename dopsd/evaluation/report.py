"""The evaluation report: figures with their per-seed values, intervals, noise floors and verdicts, one verdict per
axis in plain words, JSON for `report.json` and a short text for the CLI. Torch-free, so the service can read and
render a stored report."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


SCHEMA = "dopsd.evaluation/1"
QUALITY_FIGURES = ("prior_drift_latent", "prior_drift_pixel", "sharpness_prior", "sharpness_concept", "consistency")
CONCEPT_FIGURES = ("concept_gap", "reference_similarity", "prompt_adherence")


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


@dataclass(frozen=True)
class Figure:
    """One measured figure. `per_seed` holds the paired per-seed values the verdict rests on (adapter against base
    on the same seed); `mean` and `ci95` summarise them; `noise_floor` is the same figure between two seeds of the
    base model; `base` / `adapter` are the raw values behind it. A figure that could not be measured has every
    number `None` and says why in `not_measured`."""

    name: str
    title: str
    unit: str
    definition: str
    per_seed: list[float] | None = None
    mean: float | None = None
    ci95: tuple[float, float] | None = None
    noise_floor: float | None = None
    base: float | None = None
    adapter: float | None = None
    verdict: str | None = None
    not_measured: str | None = None

    @classmethod
    def missing(cls, name: str, title: str, unit: str, definition: str, reason: str) -> Figure:
        """A figure that was not measured, with the reason in words (never a placeholder number)."""
        return cls(
            name=name, title=title, unit=unit, definition=definition, verdict="not measured", not_measured=reason
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return _clean(dataclasses.asdict(self))


@dataclass(frozen=True)
class AxisVerdict:
    """The verdict of one axis (`concept`: learned / not learned / inconclusive; `few_step_quality`: kept /
    degraded / inconclusive) and why, in a sentence a user can act on."""

    verdict: str
    summary: str
    figures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Report:
    """What an evaluation of one adapter found, against the base model on the same seeds."""

    adapter: str | None
    step: int | None
    quick: bool
    seeds: list[int]
    width: int
    height: int
    num_steps: int
    consistency_steps: int | None
    concept_prompts: list[str]
    prior_prompts: list[str]
    embedding_model: str | None
    figures: dict[str, Figure]
    concept: AxisVerdict
    few_step_quality: AxisVerdict
    thresholds: dict[str, float | str]
    cost: dict[str, float | int]
    # A run that continued an earlier adapter: did it keep it (`dopsd.evaluation.retention`)? None otherwise.
    retention: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON (`report.json`): axes first, then every figure with its numbers."""
        data = {
            "schema": SCHEMA,
            "adapter": self.adapter,
            "step": self.step,
            "quick": self.quick,
            "verdicts": {"concept": self.concept.to_dict(), "few_step_quality": self.few_step_quality.to_dict()},
            "figures": {name: fig.to_dict() for name, fig in self.figures.items()},
            "setting": {
                "seeds": self.seeds,
                "width": self.width,
                "height": self.height,
                "num_steps": self.num_steps,
                "consistency_steps": self.consistency_steps,
                "concept_prompts": self.concept_prompts,
                "prior_prompts": self.prior_prompts,
                "embedding_model": self.embedding_model,
            },
            "thresholds": self.thresholds,
            "cost": self.cost,
        }
        if self.retention is not None:
            data["retention"] = self.retention
        return _clean(data)

    def render_text(self) -> str:
        """A few lines for a terminal: the two verdicts, then each figure's mean, interval and noise floor."""
        kind = "quick check" if self.quick else "evaluation"
        lines = [
            f"{kind}: {len(self.seeds)} seed(s), {self.num_steps} steps, {self.width}x{self.height}",
            f"concept: {self.concept.verdict} - {self.concept.summary}",
            f"few-step quality: {self.few_step_quality.verdict} - {self.few_step_quality.summary}",
        ]
        for fig in self.figures.values():
            if fig.not_measured is not None:
                lines.append(f"  {fig.title}: not measured ({fig.not_measured})")
                continue
            ci = f" [{fig.ci95[0]:.3g}, {fig.ci95[1]:.3g}]" if fig.ci95 else ""
            floor = f", noise floor {fig.noise_floor:.3g}" if fig.noise_floor is not None else ""
            mean = f"{fig.mean:.3g}" if fig.mean is not None else "-"
            lines.append(f"  {fig.title}: {mean}{ci} {fig.unit}{floor} -> {fig.verdict}")
        if self.retention is not None:
            lines.append(
                f"retention of the earlier adapter: {self.retention.get('verdict')} - {self.retention.get('summary')}"
            )
        seconds = self.cost.get("seconds")
        if isinstance(seconds, float | int):
            lines.append(f"  cost: {seconds:.2f} s, {self.cost.get('forward_passes')} forward passes")
        return "\n".join(lines)
