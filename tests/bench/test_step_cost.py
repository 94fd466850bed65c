"""The step-cost benchmark runs in quick mode and reports a D-OPSD step dearer than one SFT step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]
KEYS = {
    "bench", "size", "dim", "layers", "resolution", "image_tokens", "dopsd_step_s", "sft_step_s", "ratio", "device",
    "torch", "threads", "repeats",
}  # fmt: skip


def test_quick_mode_prints_one_json_line_with_both_step_times() -> None:
    """`bench/step_cost.py --quick`: one tiny-size record; D-OPSD (4 teacher + 4 student passes) costs more."""
    proc = subprocess.run(
        [sys.executable, "bench/step_cost.py", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    record = json.loads(lines[0])
    assert KEYS <= record.keys(), KEYS - record.keys()
    assert record["bench"] == "step_cost"
    assert record["size"] == "tiny"
    assert record["repeats"] == 2
    assert record["dopsd_step_s"] > 0
    assert record["sft_step_s"] > 0
    assert record["ratio"] == pytest.approx(record["dopsd_step_s"] / record["sft_step_s"], rel=1e-3, abs=1e-3)
    assert record["ratio"] > 1
