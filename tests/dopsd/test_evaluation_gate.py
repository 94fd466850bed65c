"""The fail-fast gate flags a teacher made blind (its context the student's own) and passes the normal one, on both
tiny presets, at a bounded cost."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dopsd.evaluation import BLIND_MESSAGE, DEFAULT_THRESHOLDS, teacher_visibility
from tests.dopsd.evaluation_helpers import evaluation_set, tiny_family


@pytest.mark.parametrize("preset", ["tiny-z-image", "tiny-flux2-klein"])
def test_blind_teacher_is_flagged_and_the_normal_one_is_not(preset: str, example_dir: Path) -> None:
    cfg, family = tiny_family(preset)
    inputs = evaluation_set(family, cfg, example_dir, seeds=2)
    normal = teacher_visibility(family, inputs, max_cases=3)
    blind_inputs = dataclasses.replace(inputs, teacher_conds=list(inputs.concept_conds))
    blind = teacher_visibility(family, blind_inputs, max_cases=3)

    assert not normal.blind and normal.message is None
    assert normal.visibility > 10 * DEFAULT_THRESHOLDS.visibility_min  # measured margin: 0.6 (z-image), 3 (klein)
    assert normal.normalised_gap > 0
    assert blind.blind and blind.message == BLIND_MESSAGE and blind.visibility == 0.0
    assert "cannot see your concept" in blind.render_text()
    # Bounded cost: per case a teacher and a student forward per state, plus one prompt-effect forward.
    assert normal.forward_passes == 3 * (2 * cfg.sample_steps + 1) and len(normal.cases) == 3
    assert [c["reference"] for c in normal.cases] == ["robot-1.png", "robot-2.png", "robot-3.png"]
    json.dumps(normal.to_dict())
