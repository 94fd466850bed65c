"""torch.compile of the transformer's repeated blocks (`compile_blocks`), on the CPU with the `aot_eager` backend
(dynamo's tracing and guards, without generating code, which is what a recompile is about): the roll-out's
teacher and student passes compile in the first step and never again, no block falls back to eager, and the run
trains what the eager run trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch._dynamo

from dopsd import DOPSDConfig, train
from tests.dopsd.test_distributed import one_thread, run_settings


def test_adapter_switches_compile_in_the_first_step_only_and_train_as_eager(tmp_path: Path, example_dir: Path) -> None:
    def run(out: Path, **given: object) -> dict[str, object]:
        settings = run_settings(out, example_dir, max_train_steps=3, checkpointing_steps=0, gap_eval_seeds=0)
        with one_thread():
            train(DOPSDConfig.for_preset(**settings, **given))
        return dict(json.loads((out / "metrics.json").read_text()))

    # A block whose variants pass torch's limit would run eager from then on, silently: here it fails the run.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        compiled = run(tmp_path / "compiled", compile_blocks=True, compile_backend="aot_eager")
    eager = run(tmp_path / "eager")
    summary = compiled["compile"]
    assert isinstance(summary, dict) and summary["backend"] == "aot_eager"
    assert summary["graphs_first_step"] > 0 and summary["graphs_later_steps"] == 0
    assert compiled["warnings"] == []  # the final samples' base and student passes compiled too
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)
