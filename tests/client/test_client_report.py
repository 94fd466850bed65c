"""The client's report lines agree with the library's own text (`Report.render_text`), from the JSON the API serves
(`Report.to_dict()`): the client cannot import the library, so this keeps the two in step. No stack needed."""

from __future__ import annotations

import json

from dopsd.evaluation.report import AxisVerdict, Figure, Report
from dopsd_client.report import evaluated_summary, report_lines


def _report(*, quick: bool) -> Report:
    """A report with a measured figure, one with no interval and one that was not measured."""
    figures = {
        "prior_drift_latent": Figure(
            "prior_drift_latent", "Prior drift (latent)", "x seed-to-seed distance", "MSE ratio",
            per_seed=[0.0007, 0.0009], mean=0.0008, ci95=(0.0007, 0.0009), noise_floor=1.0, verdict="kept",
        ),
        "consistency": Figure(
            "consistency", "Consistency", "log ratio", "2x steps", per_seed=[0.61], mean=0.61, noise_floor=0.143,
            verdict="degraded",
        ),
        "reference_similarity": Figure.missing(
            "reference_similarity", "Reference similarity", "cosine delta", "embeddings", "no embedding model"
        ),
    }  # fmt: skip
    return Report(
        adapter="student", step=40, quick=quick, seeds=[7001] if quick else [7001, 7002, 7003, 7004], width=64,
        height=64, num_steps=8, consistency_steps=16, concept_prompts=["a photo of sks"], prior_prompts=["a lake"],
        embedding_model=None, figures=figures,
        concept=AxisVerdict("not learned", "the held-out gap rose by 12%; lower the learning rate", ["concept_gap"]),
        few_step_quality=AxisVerdict("degraded", "consistency is past its threshold", ["consistency"]),
        thresholds={"drift_kept": 0.005}, cost={"seconds": 1.5, "forward_passes": 512},
    )  # fmt: skip


def test_the_lines_are_the_libraries_text_from_the_served_json() -> None:
    for quick in (False, True):
        report = _report(quick=quick)
        served = json.loads(json.dumps(report.to_dict()))  # what GET /v1/jobs/{id} carries as `report`
        lines = report_lines(served)
        library = report.render_text().splitlines()
        kind = "quick check" if quick else "evaluation"
        assert lines[0] == f"{kind} at step 40: {len(report.seeds)} seed(s), 8 steps, 64x64"
        # The verdicts and figures word for word; the library's cost line is the operator's, not printed.
        assert lines[1:] == [line for line in library[1:] if not line.startswith("  cost:")]
    assert "concept: not learned - the held-out gap rose by 12%; lower the learning rate" in lines
    assert "  Reference similarity: not measured (no embedding model)" in lines


def test_an_evaluated_event_is_one_line() -> None:
    verdicts = _report(quick=True).to_dict()["verdicts"]
    assert evaluated_summary({"step": 4, "quick": True, "verdicts": verdicts}) == (
        "quick check at step 4: concept not learned, few-step quality degraded"
    )
    assert evaluated_summary({"step": 9, "quick": False, "verdicts": {}}) == "evaluation at step 9"
