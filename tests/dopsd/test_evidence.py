"""The evidence a run gathers, through `train()` and `dopsd train`: the teacher gate stops a run whose teacher
cannot see the concept before its first step (unless forced), quick checks come at sample steps, the final report
lands in report.json and metrics.json, and `keep: best` keeps an earlier, better step's adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dopsd.callbacks import TrainerCallback
from dopsd.cli import main as cli_main
from dopsd.config import DOPSDConfig
from dopsd.errors import TeacherBlind
from dopsd.evaluation.report import Report
from dopsd.evaluation.selection import best_step
from dopsd.lora import LORA_WEIGHT_NAME
from dopsd.models.base import ModelFamily
from dopsd.models.loading import load_family_for
from dopsd.trainer import resolve_device, train
from tests.dopsd.test_trainer import quick_config


def config(example_dir: Path, out: Path, **overrides: Any) -> DOPSDConfig:
    """The trainer tests' quick run, with a report on two seeds."""
    return quick_config(example_dir, out, **{"eval_seeds": 2, **overrides})


class Evaluations(TrainerCallback):
    def __init__(self) -> None:
        self.reports: list[Report] = []
        self.steps = 0

    def on_evaluation(self, report: Report) -> None:
        self.reports.append(report)

    def on_step_end(self, state: Any) -> None:
        self.steps += 1


def blind(cfg: DOPSDConfig) -> ModelFamily:
    """The tiny family with its teacher context replaced by the student's own features: a teacher that sees
    nothing the student does not."""
    device, dtype = resolve_device(cfg)
    family = load_family_for(cfg, device=device, dtype=dtype)

    def encode_teacher(image: Any, caption: str, **kwargs: Any) -> Any:
        return family.encode_student([caption], kwargs["text_max_length"])[0]

    family.encode_teacher = encode_teacher  # type: ignore[method-assign]
    return family


def test_a_blind_teacher_fails_before_the_first_step_and_writes_no_adapter(example_dir: Path, tmp_path: Path) -> None:
    cfg = config(example_dir, tmp_path)
    seen = Evaluations()
    with pytest.raises(TeacherBlind) as caught:
        train(cfg, [seen], family=blind(cfg))
    assert "cannot see your concept" in caught.value.message
    assert caught.value.figures["blind"] is True
    assert seen.steps == 0 and not (tmp_path / LORA_WEIGHT_NAME).exists()


def test_force_trains_a_blind_teacher_anyway(example_dir: Path, tmp_path: Path) -> None:
    cfg = config(example_dir, tmp_path, force=True, max_train_steps=2)
    train(cfg, family=blind(cfg))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["teacher_check"]["blind"] is True and (tmp_path / LORA_WEIGHT_NAME).exists()


def test_the_normal_teacher_passes_and_the_run_reports_on_itself(example_dir: Path, tmp_path: Path) -> None:
    seen = Evaluations()
    train(config(example_dir, tmp_path, sample_every=3), [seen])
    quick = [r for r in seen.reports if r.quick]
    final = [r for r in seen.reports if not r.quick]
    assert [r.step for r in quick] == [3] and [r.step for r in final] == [6]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["step"] == 6 and len(report["setting"]["seeds"]) == 2
    assert report["verdicts"]["concept"]["verdict"] in ("learned", "not learned", "inconclusive")
    assert report["teacher_check"]["blind"] is False
    assert report["figures"]["reference_similarity"]["not_measured"]  # no embedding model: said, not made up
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["evaluation"]["concept"] == report["verdicts"]["concept"]["verdict"]
    assert metrics["kept_step"] == 6


def test_keep_best_keeps_the_step_its_rule_picks(example_dir: Path, tmp_path: Path) -> None:
    """`keep: best` keeps the evaluated step with the lowest held-out gap whose quality is not degraded; the report
    judges that adapter and says which step it is."""
    seen = Evaluations()
    train(config(example_dir, tmp_path, max_train_steps=6, sample_every=2, keep="best"), [seen])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    report = json.loads((tmp_path / "report.json").read_text())
    quick = [r for r in seen.reports if r.quick]
    final_last = next(r for r in seen.reports if not r.quick and r.step == 6) if metrics["kept_step"] == 6 else None
    expected = best_step([*quick, final_last] if final_last else quick)
    assert metrics["kept_step"] == report["step"] == (expected if expected is not None else 6)


def test_keep_best_keeps_the_last_step_when_every_step_is_degraded(example_dir: Path, tmp_path: Path) -> None:
    """A destructive learning rate (0.5) degrades the model from the first step on: no step is better, the last
    adapter is kept and its report says degraded."""
    cfg = config(example_dir, tmp_path, learning_rate=0.5, max_train_steps=4, sample_every=1, keep="best")
    train(cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    assert json.loads((tmp_path / "metrics.json").read_text())["kept_step"] == report["step"] == 4
    assert report["verdicts"]["few_step_quality"]["verdict"] == "degraded"


def test_dopsd_train_prints_the_report(example_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(
        ["train", "--preset", "tiny-z-image", "--images", str(example_dir), "--trigger", "sks", "--steps", "3",
         "--eval-seeds", "1", "--out", str(tmp_path), "--quiet"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "concept: " in printed and "few-step quality: " in printed and "report: " in printed
