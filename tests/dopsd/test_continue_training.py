"""Continuing an earlier adapter (`init_adapter`, `dopsd train --init-adapter`) on the tiny preset: the run starts
where its parent ended, both adapters start from the file, its shape is the file's, a resume wins over it, and the
report says what it kept of the parent (retention)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from dopsd import DOPSDConfig, StepState, TrainerCallback, TrainerControl, TrainingCancelled, train
from dopsd.cli import main as cli_main
from dopsd.data import DataError
from dopsd.evaluation.adapters import attach_adapter_file, detach_adapter
from dopsd.evaluation.retention import load_reference, measure_retention, prepare_retention
from dopsd.lora import (
    LORA_WEIGHT_NAME,
    STUDENT_ADAPTER,
    TEACHER_ADAPTER,
    adapter_state,
    init_adapter_settings,
    read_adapter_file,
)
from dopsd.models.base import ModelFamily
from dopsd.models.loading import load_family_for


PROMPTS = ["a photo of [V]", "[V] on a beach"]


def run_args(example_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--preset", "tiny-z-image", "--images", str(example_dir),
        "--captions", str(example_dir / "captions.json"), "--validation-prompts", *PROMPTS,
        "--sample-seeds", "0", "1", "--gap-eval-seeds", "1", "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory, example_dir: Path) -> Path:
    """20 steps at rank 4 / alpha 8 (not the preset's 8 / 16, so the shape must come from the file), no report."""
    out = tmp_path_factory.mktemp("parent")
    assert (
        cli_main(run_args(example_dir, out, "--steps", "20", "--rank", "4", "--lora-alpha", "8", "--eval-seeds", "0"))
        == 0
    )
    return out


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory, example_dir: Path, parent: Path) -> Path:
    """`dopsd train --init-adapter PARENT` without a rank: 4 more steps on the same images, captions and seeds,
    with a one-seed report (which carries the retention section)."""
    out = tmp_path_factory.mktemp("child")
    assert (
        cli_main(run_args(example_dir, out, "--steps", "4", "--init-adapter", str(parent), "--eval-seeds", "1")) == 0
    )
    return out


def metrics(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.json").read_text())


def quick(example_dir: Path, out: Path, parent: Path, **overrides: Any) -> DOPSDConfig:
    values: dict[str, Any] = {
        "instance_data_dir": str(example_dir), "output_dir": str(out), "max_train_steps": 2,
        "validation_prompts": ["a photo of [V]"], "sample_seeds": [0], "gap_eval_seeds": 0, "eval_seeds": 0,
        "init_adapter": str(parent), **init_adapter_settings(parent),
    }  # fmt: skip
    values.update(overrides)
    return DOPSDConfig.for_preset("tiny-z-image", **values)


class Watch(TrainerCallback):
    """Keeps both adapters as they are before the first step, and stops after `stop_at` steps (if given)."""

    def __init__(self, family: ModelFamily, stop_at: int | None = None) -> None:
        self.family, self.stop_at = family, stop_at
        self.start: dict[str, dict[str, torch.Tensor]] = {}
        self.start_step: int | None = None

    def on_train_begin(self, total_steps: int, start_step: int) -> None:
        self.start_step = start_step
        names = self.family.transformer.peft_config
        self.start = {name: adapter_state(self.family.transformer, name) for name in names}

    def on_step_end(self, state: StepState) -> TrainerControl:
        return TrainerControl(should_stop=state.step == self.stop_at)


@pytest.fixture(scope="module")
def family(parent: Path) -> ModelFamily:
    return load_family_for(DOPSDConfig.load(parent / "config.json"), device=torch.device("cpu"), dtype=torch.float32)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_continued_run_starts_where_its_parent_ended(parent: Path, child: Path) -> None:
    p, c = metrics(parent), metrics(child)
    # The gap probe reads the base model with the image in context: the same target for both runs, so the same
    # student on the same pairs and noise gives the same number (measured: bit-identical in fp32 on the CPU).
    assert c["teacher_student_gap"]["before"] == pytest.approx(p["teacher_student_gap"]["after"], rel=1e-6, abs=0)
    assert c["teacher_student_gap"]["before"] < p["teacher_student_gap"]["before"]
    # The first step of both runs draws the same pair and noise (same seed): a run that started over would repeat
    # the parent's first loss exactly; this one starts where the parent ended, not above it (FIRST_LOSS).
    first, parent_first, parent_end = c["loss"][0], p["loss"][0], statistics.mean(p["loss"][-5:])
    assert first < parent_first
    assert FIRST_LOSS[0] * parent_end <= first <= FIRST_LOSS[1] * parent_end, (first, parent_end, parent_first)
    assert c["init_adapter"] == {"source": parent.name, "steps": 20, "rank": 4, "alpha": 8.0}
    config = DOPSDConfig.load(child / "config.json")
    assert (config.rank, config.lora_alpha) == (4, 8.0)  # taken from the file by `dopsd train`


# The continued run's first loss over the mean of its parent's last 5, measured (fp32, CPU): 0.36 here (parent 20
# steps at rank 4), 0.49 and 0.66 after 30 and 50 parent steps at rank 8 (bench/retention_calibration.py). Below
# 1 because the teacher starts from the parent's student (the parent's own EMA teacher had barely left the base
# model); with `init_teacher: base` it is 1.26 after 30 steps. The parent's own last-5 spread is about +-20%.
FIRST_LOSS = (0.2, 1.2)


def test_both_adapters_start_from_the_file(
    example_dir: Path, tmp_path: Path, parent: Path, family: ModelFamily
) -> None:
    file = read_adapter_file(parent)
    assert (file.rank, file.alpha, file.steps) == (4, 8.0, 20)
    watch = Watch(family)
    result = train(quick(example_dir, tmp_path / "ema", parent), [watch], family=family)
    assert_same(watch.start[STUDENT_ADAPTER], file.state)
    assert_same(watch.start[TEACHER_ADAPTER], file.state)  # the EMA teacher starts as the student does
    assert result.metrics["init_adapter"]["steps"] == 20


def test_a_base_model_teacher_is_an_option(
    example_dir: Path, tmp_path: Path, parent: Path, family: ModelFamily
) -> None:
    watch = Watch(family)
    train(quick(example_dir, tmp_path, parent, init_teacher="base"), [watch], family=family)
    assert_same(watch.start[STUDENT_ADAPTER], read_adapter_file(parent).state)
    teacher = watch.start[TEACHER_ADAPTER]
    assert all(not v.any() for k, v in teacher.items() if "lora_B" in k)  # B = 0: exactly the base model


def test_a_frozen_teacher_of_a_continued_run_stays_the_earlier_adapter(
    example_dir: Path, tmp_path: Path, parent: Path, family: ModelFamily
) -> None:
    class AtEnd(Watch):
        def on_train_end(self, output_dir: Path) -> None:
            self.end = adapter_state(self.family.transformer, TEACHER_ADAPTER)
            self.student = adapter_state(self.family.transformer, STUDENT_ADAPTER)

    watch = AtEnd(family)
    train(quick(example_dir, tmp_path, parent, teacher_mode="frozen"), [watch], family=family)
    file = read_adapter_file(parent)
    assert_same(watch.start[TEACHER_ADAPTER], file.state)
    assert_same(watch.end, file.state)
    assert any(not torch.equal(watch.student[k], file.state[k]) for k in file.state)


def test_another_rank_is_refused_naming_both(example_dir: Path, tmp_path: Path, parent: Path) -> None:
    config = quick(example_dir, tmp_path, parent, rank=8, lora_alpha=16.0)
    with pytest.raises(DataError, match=r"rank 4 and alpha 8, but this run asks for rank 8 and alpha 16") as info:
        train(config)
    assert info.value.code == "init_adapter_mismatch"
    assert not (tmp_path / LORA_WEIGHT_NAME).exists()


def test_a_file_that_is_not_an_adapter_is_refused(example_dir: Path, tmp_path: Path, parent: Path) -> None:
    with pytest.raises(DataError, match="no adapter file"):
        train(quick(example_dir, tmp_path, parent, init_adapter=str(tmp_path / "missing.safetensors")))


def test_a_resumed_checkpoint_wins_over_the_init_adapter(
    example_dir: Path, tmp_path: Path, parent: Path, family: ModelFamily
) -> None:
    out = tmp_path / "run"
    with pytest.raises(TrainingCancelled):
        train(quick(example_dir, out, parent, max_train_steps=3), [Watch(family, stop_at=1)], family=family)
    checkpoint = sorted((out / "checkpoints").glob("step-*"))[-1]
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "student.safetensors"))
    resumed = Watch(family)
    result = train(quick(example_dir, out, parent, max_train_steps=3, resume_from=str(out)), [resumed], family=family)
    assert resumed.start_step == 1
    assert_same(resumed.start[STUDENT_ADAPTER], saved)
    file = read_adapter_file(parent)
    assert any(not torch.equal(saved[k], file.state[k]) for k in saved)  # the checkpoint's, not the file's
    assert result.metrics["init_adapter"]["source"] == parent.name  # still says where the run started
    # A resumed run goes on when the earlier adapter's files are gone (a service job whose parent was deleted).
    gone = train(
        quick(example_dir, out, parent, max_train_steps=4, resume_from=str(out), init_adapter=str(tmp_path / "gone")),
        family=family,
    )
    assert gone.metrics["steps"] == 4


def test_retention_section_of_a_continued_run(child: Path) -> None:
    report = json.loads((child / "report.json").read_text())
    retention = report["retention"]
    assert retention["verdict"] in ("kept", "partly", "lost")
    assert retention["cases"] == [{"prompt": p.replace("[V]", "sks"), "seed": s} for p in PROMPTS for s in (0, 1)]
    assert retention["setting"] == {"width": 64, "height": 64, "num_steps": 8}
    figure = retention["figures"]["retention_pixel"]
    assert len(figure["per_seed"]) == 4 and all(v <= 1.0 for v in figure["per_seed"])
    assert figure["ci95"][0] <= figure["mean"] <= figure["ci95"][1]
    assert figure["base"] > 0 and figure["verdict"] == retention["verdict"]
    assert retention["figures"]["retention_embedding"]["not_measured"]  # no embedding model on this machine
    assert metrics(child)["retention"]["verdict"] == retention["verdict"]


def test_retention_is_one_for_the_earlier_adapter_and_zero_for_the_base_model(
    parent: Path, family: ModelFamily
) -> None:
    """The figure's two anchors, exactly: the earlier adapter renders its own samples again pixel for pixel (same
    prompts, seeds, settings and pipeline call), and the base model is the baseline itself."""
    text_length = DOPSDConfig.load(parent / "config.json").student_max_sequence_length
    inputs = prepare_retention(family, load_reference(parent), text_length)
    attach_adapter_file(family, parent / LORA_WEIGHT_NAME)
    try:
        itself = measure_retention(family, inputs)
        base = measure_retention(family, inputs, adapter=None)
    finally:
        detach_adapter(family)
    assert itself["figures"]["retention_pixel"]["per_seed"] == [1.0] * 4 and itself["verdict"] == "kept"
    assert base["figures"]["retention_pixel"]["per_seed"] == [0.0] * 4 and base["verdict"] == "lost"
