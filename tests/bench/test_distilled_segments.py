"""The distilled-segments diagnostic on the shipped `shapes` weights: K = 0 base steps is the distilled model's own
prior probe, K = 4 the base's, so the hybrids in between are measured on the same noises and probe."""

from __future__ import annotations

import json

import pytest
import torch

from bench import distilled_segments
from dopsd.models.shapes import weights_path
from dopsd.shapes import gates
from dopsd.shapes.metrics import load_classifier
from dopsd.shapes.model import load_model


def test_no_base_steps_is_the_distilled_model_and_four_are_the_base(capsys: pytest.CaptureFixture[str]) -> None:
    distilled_segments.main(["--first", "0", "4", "--seeds", "3", "--n", "12"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["seed"], r["base_steps_first"]) for r in lines] == [(3, 0), (3, 4)]
    classifier = load_classifier()
    for line, name in zip(lines, ("shapes://distilled", "shapes://base"), strict=True):
        with torch.no_grad():
            own = gates.prior_metrics(load_model(weights_path(name)), classifier, steps=4, n=12, seed=3)
        assert line["accuracy"] == own["accuracy"] and line["frechet"] == pytest.approx(own["frechet"], rel=1e-4)


def test_more_base_steps_than_the_schedule_has_are_refused() -> None:
    with pytest.raises(SystemExit):
        distilled_segments.main(["--first", "5"])
