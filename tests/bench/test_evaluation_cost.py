"""The evaluation-cost benchmark's quick mode: a short tiny-z-image run, the gate and the report timed against its
training steps in one process, the real presets' estimate, and the summary line last."""

from __future__ import annotations

from bench import evaluation_cost
from tests.bench.conftest import run_bench


def test_quick_mode_times_gate_and_report_against_training() -> None:
    *records, summary = run_bench("evaluation_cost.py", "--quick", timeout_s=600)
    measured = [r for r in records if r["bench"] == "evaluation_cost"]
    assert len(measured) == 1
    (run,) = measured
    assert run["preset"] == "tiny-z-image" and run["train_steps"] == 8 and run["seeds"] == 2
    assert run["train_step_s"] > 0 and run["gate_s"] > 0 and run["report_s"] > 0 and run["quick_s"] > 0
    assert run["quick_forwards"] < run["report_forwards"] and run["gate_forwards"] == 4 * (2 * 8 + 1)
    assert run["evaluation_over_training"] > 0 and run["blind"] is False
    assert run["command"] == "python bench/evaluation_cost.py --quick"
    estimates = {r["preset"]: r for r in records if r["bench"] == "evaluation_cost_estimate"}
    assert set(estimates) == {"z-image-turbo", "flux2-klein-4b"} and all(r["estimate"] for r in estimates.values())
    assert summary["bench"] == "evaluation_cost_summary" and summary["measured"][0]["preset"] == "tiny-z-image"


def test_estimate_is_forward_pass_arithmetic() -> None:
    """Z-Image-Turbo defaults: 2,000 steps x 4 states x (teacher forward + checkpointed student forward/backward
    = 5 forwards); the report renders base and adapter: 8 prompts x 4 seeds x 8 steps, the teacher on the 4
    concept prompts, 2 prompts again at 16 steps, 32 decodes."""
    z = evaluation_cost.forward_estimate("z-image-turbo")
    assert z["train_forwards"] == 2000 * 4 * 5
    assert z["report_forwards"] == 2 * (8 * 4 * 8 + 4 * 4 * 8 + 2 * 4 * 16 + 32)
    assert z["gate_forwards"] == 4 * 2 * 8 + 4
    assert z["report_over_training"] < z["goal"]
    klein = evaluation_cost.forward_estimate("flux2-klein-4b")
    assert klein["train_forwards"] == 3000 * 4 * 5 and klein["native_steps"] == 4
