"""The evaluation's statistics, verdict rules and report format, on numbers made up for the purpose."""

from __future__ import annotations

import json

import pytest

from dopsd.evaluation.evaluate import concept_axis
from dopsd.evaluation.report import AxisVerdict, Figure, Report
from dopsd.evaluation.selection import best_step
from dopsd.evaluation.stats import bootstrap_mean_ci, noise_floor, seed_pairs
from dopsd.evaluation.thresholds import DEFAULT_THRESHOLDS, concept_verdict, direction, one_sided, two_sided


def test_bootstrap_interval_is_seeded_and_brackets_the_mean() -> None:
    values = [0.1, 0.4, 0.35, 0.2]
    ci = bootstrap_mean_ci(values)
    assert ci is not None and ci == bootstrap_mean_ci(values)
    assert ci[0] < sum(values) / 4 < ci[1]
    assert min(values) <= ci[0] and ci[1] <= max(values)
    wider = bootstrap_mean_ci([0.1, 0.9, -0.5, 1.4])
    assert wider is not None and wider[1] - wider[0] > ci[1] - ci[0]
    assert bootstrap_mean_ci([0.3]) is None  # one seed: no spread to estimate


def test_noise_floor_pairs_different_seeds() -> None:
    assert seed_pairs(1) == [] and seed_pairs(2) == [(0, 1)] and seed_pairs(3) == [(0, 1), (1, 2), (2, 0)]
    assert noise_floor([1.0, 3.0, 2.0]) == pytest.approx((2.0 + 1.0 + 1.0) / 3)
    assert noise_floor([1.0]) is None
    assert noise_floor([0.0, 0.0], distance=lambda i, j: float(i + j)) == 1.0


def test_verdict_rules_need_the_whole_interval_past_a_threshold() -> None:
    assert one_sided(0.2, (0.1, 0.3), kept=0.5, degraded=0.9) == "kept"
    assert one_sided(1.2, (1.0, 1.5), kept=0.5, degraded=0.9) == "degraded"
    assert one_sided(0.7, (0.3, 1.2), kept=0.5, degraded=0.9) == "inconclusive"
    assert two_sided(-2.0, (-2.5, -1.5), kept=0.5, degraded=1.0) == "degraded"  # blur
    assert two_sided(2.0, (1.5, 2.5), kept=0.5, degraded=1.0) == "degraded"  # noise
    assert two_sided(0.1, (-0.2, 0.3), kept=0.5, degraded=1.0) == "kept"
    th = DEFAULT_THRESHOLDS
    assert concept_verdict(-0.4, (-0.5, -0.3), th) == "learned"
    assert concept_verdict(0.5, (0.2, 0.8), th) == "not learned"
    assert concept_verdict(-0.02, (-0.3, 0.2), th) == "inconclusive"
    assert concept_verdict(-0.4, None, th) == "learned"  # one seed: the point value decides
    assert direction(0.1, (0.05, 0.2)) == "higher" and direction(-0.1, (-0.2, -0.05)) == "lower"
    assert direction(0.0, (-0.1, 0.1)) == "no clear change" and direction(0.1, None) == "inconclusive"


def _concept_figures(
    gap: tuple[float, float, float], similarity: tuple[float, float, float, float] | None
) -> dict[str, Figure]:
    """The concept figures: the gap's (mean, low, high) relative change; the similarity's (mean, low, high, floor)
    cosine delta, or not measured."""
    mean, low, high = gap
    figures = {
        "concept_gap": Figure(
            "concept_gap",
            "gap",
            "relative change",
            "d",
            per_seed=[mean],
            mean=mean,
            ci95=(low, high),
            verdict=concept_verdict(mean, (low, high), DEFAULT_THRESHOLDS),
        ),
        "prompt_adherence": Figure.missing("prompt_adherence", "adherence", "cosine delta", "d", "no text tower"),
    }
    if similarity is None:
        figures["reference_similarity"] = Figure.missing("reference_similarity", "s", "cosine delta", "d", "none")
    else:
        mean, low, high, floor = similarity
        figures["reference_similarity"] = Figure(
            "reference_similarity", "similarity", "cosine delta", "d", per_seed=[mean], mean=mean, ci95=(low, high),
            noise_floor=floor, verdict=direction(mean, (low, high)),
        )  # fmt: skip
    return figures


@pytest.mark.parametrize(
    ("gap", "similarity", "verdict"),
    [
        # the shapes job of `make run`: the adapter drew the cross where the teacher did not, so the pixel gap rose,
        # but its samples are clearly more like the references than the base model's: the figures disagree
        ((0.10, 0.08, 0.12), (0.048, 0.042, 0.053, 0.009), "inconclusive"),
        ((-0.01, -0.03, 0.01), (0.048, 0.042, 0.053, 0.009), "learned"),  # a flat gap, a clear rise in similarity
        ((0.10, 0.08, 0.12), (0.005, 0.001, 0.009, 0.009), "not learned"),  # within the seed-to-seed spread
        ((0.10, 0.08, 0.12), (0.048, -0.01, 0.09, 0.009), "not learned"),  # the interval reaches zero
        ((0.10, 0.08, 0.12), None, "not learned"),  # no embedder: the gap alone
        ((-0.01, -0.12, 0.05), (0.03, 0.02, 0.04, 0.01), "learned"),
        ((-0.40, -0.50, -0.30), (-0.03, -0.04, -0.02, 0.01), "inconclusive"),  # fell, yet less like the references
        ((-0.40, -0.50, -0.30), None, "learned"),
    ],
)
def test_the_concept_verdict_weighs_the_gap_and_the_similarity(
    gap: tuple[float, float, float], similarity: tuple[float, float, float, float] | None, verdict: str
) -> None:
    figures = _concept_figures(gap, similarity)
    said = concept_axis(figures, DEFAULT_THRESHOLDS)
    assert said.verdict == verdict, said.summary
    if similarity is not None and figures["reference_similarity"].verdict == "higher":
        assert ("more like your reference images" in said.summary) == (similarity[0] > similarity[3]), said.summary


def _report(step: int, gap: float, quality: str) -> Report:
    figure = Figure(
        "concept_gap", "gap", "relative change", "d", per_seed=[-0.1], mean=-0.1, adapter=gap, verdict="learned"
    )
    missing = Figure.missing("reference_similarity", "similarity", "cosine delta", "d", "no model folder")
    return Report(
        adapter="student",
        step=step,
        quick=False,
        seeds=[1, 2],
        width=64,
        height=64,
        num_steps=8,
        consistency_steps=16,
        concept_prompts=["a photo of sks"],
        prior_prompts=["a bowl of fruit"],
        embedding_model=None,
        figures={"concept_gap": figure, "reference_similarity": missing},
        concept=AxisVerdict("learned", "fell"),
        few_step_quality=AxisVerdict(quality, "q"),
        thresholds=DEFAULT_THRESHOLDS.to_dict(),
        cost={"seconds": 1.5, "forward_passes": 10},
    )


def test_report_is_json_with_not_measured_as_null_and_a_reason() -> None:
    data = json.loads(json.dumps(_report(10, 0.01, "kept").to_dict()))
    assert data["schema"] == "dopsd.evaluation/1" and data["verdicts"]["concept"]["verdict"] == "learned"
    missing = data["figures"]["reference_similarity"]
    assert missing["mean"] is None and missing["per_seed"] is None and missing["not_measured"] == "no model folder"
    assert missing["verdict"] == "not measured"
    text = _report(10, 0.01, "kept").render_text()
    assert "concept: learned" in text and "not measured (no model folder)" in text


def test_best_step_skips_degraded_steps() -> None:
    reports = [_report(10, 0.02, "kept"), _report(20, 0.005, "degraded"), _report(30, 0.01, "inconclusive")]
    assert best_step(reports) == 30
    assert best_step([_report(20, 0.005, "degraded")]) is None
