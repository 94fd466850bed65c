"""The replication benchmark's quick mode on the shipped `shapes` weights: every arm runs (SFT by hand, D-OPSD through
the trainer with each teacher mode), every figure is measured at 4 steps and at the many-step control, the D-OPSD
arms carry the report's verdicts, the gates are printed, and the summary line comes last.

The shipped base's in-context gates are asserted: its teacher (the trigger caption with a cross reference) draws the
cross at least half the time, and the trigger caption alone stays near 0 (docs/replication.md measures 1.00 and
0.00 on 48 samples). The prior-accuracy gate (>= 0.9 at 4 steps) is printed, not asserted: it is the distilled
model's gate, and though the shipped base measures 0.93-0.95 at 4 steps on 576 samples, a 12-sample probe's noise
spans the line. No direction of the claim is asserted: the full benchmark does not show one beyond its intervals."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from bench import replication
from tests.bench.conftest import run_bench


# Three D-OPSD trainings with their gate and report, two SFT runs, the gates: about 3 minutes on a shared 2-core CPU.
pytestmark = pytest.mark.timeout(900)


ARMS = {"base", "sft", "dopsd_ema", "dopsd_frozen", "dopsd_live"}


def test_quick_mode_runs_every_arm_and_prints_the_gates_and_the_summary_last(tmp_path: Path) -> None:
    gates, *records, summary = run_bench("replication.py", "--quick", "--sheets", str(tmp_path), timeout_s=900)
    assert gates["bench"] == "replication_gates"
    assert 0 <= gates["prior_accuracy@4"] <= 1 and 0 <= gates["teacher_concept_rate@4"] <= 1
    assert set(gates["passed"]) == {"prior_accuracy", "teacher_concept_rate", "trigger_text_near_zero"}
    assert gates["passed"]["teacher_concept_rate"] and gates["teacher_concept_rate@4"] >= 0.5
    assert gates["passed"]["trigger_text_near_zero"] and gates["trigger_text_concept_rate@4"] <= 0.1
    assert {r["arm"] for r in records} >= ARMS and all(r["seed"] == 0 for r in records)
    for r in records:
        for steps in (4, 20):
            assert 0 <= r[f"concept_rate@{steps}"] <= 1 and 0 <= r[f"prior_accuracy@{steps}"] <= 1
            assert r[f"prior_purity@{steps}"] > 0.5 and r[f"prior_frechet@{steps}"] >= 0
            assert r[f"concept_purity@{steps}"] > 0.5 and r[f"concept_spread_x_std@{steps}"] >= 0
        assert ("report" in r) == r["arm"].startswith("dopsd")
    for r in records:
        if r["arm"].startswith("dopsd"):
            assert r["report"]["concept"] and r["report"]["few_step_quality"]
            # the preset's own embedder (a CNN that never saw the cross) measures the similarity figure
            assert r["report"]["reference_similarity"]["mean"] is not None
    assert summary["bench"] == "replication_summary" and summary["command"] == "python bench/replication.py --quick"
    assert set(summary["arms"]) == {r["arm"] for r in records}
    assert {a["arm"] for a in summary["report_vs_ground_truth"]} == {"dopsd_ema", "dopsd_frozen", "dopsd_live"}
    assert summary["gates"] == {k: v for k, v in gates.items() if k != "bench"}
    for arm in ARMS:  # one sheet per arm: 2 rows (prior, trigger) of 12 samples of 16 px + 1 px frame, at 6x
        with Image.open(tmp_path / f"{arm}.png") as sheet:
            assert sheet.size == (12 * 18 * 6, 2 * 18 * 6)


def test_dopsd_options_are_read_as_json_where_they_parse() -> None:
    args = replication.parse_args(["--dopsd-option", "loss_space=velocity", "--dopsd-option", "ema_decay=0.99"])
    assert args.dopsd_option == {"loss_space": "velocity", "ema_decay": 0.99}
    with pytest.raises(SystemExit):
        replication.parse_args(["--dopsd-option", "no-equals-sign"])
