"""Trainer behaviour on the tiny preset: resume, callbacks, teacher modes, and what the optimizer touches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dopsd import DOPSDConfig, StepState, TrainerCallback, TrainerControl, TrainingCancelled, train
from dopsd.checkpoint import list_checkpoints
from dopsd.errors import CheckpointError
from dopsd.lora import (
    STUDENT_ADAPTER,
    TEACHER_ADAPTER,
    add_adapters,
    ema_update,
    make_lora_config,
    student_parameters,
    teacher_parameters,
)
from dopsd.models.loading import load_family
from dopsd.presets import get_preset
from dopsd.rollout import distillation_rollout
from dopsd.sampling import SampleSet


def quick_config(example_dir: Path, out: Path, **overrides: Any) -> DOPSDConfig:
    """A few-step run with one sample prompt and seed, to keep tests at a second or two."""
    values: dict[str, Any] = {
        "instance_data_dir": str(example_dir),
        "output_dir": str(out),
        "max_train_steps": 6,
        "validation_prompts": ["a photo of [V]"],
        "sample_seeds": [0],
        "gap_eval_seeds": 1,
        "eval_seeds": 0,  # no report: these tests are about training (tests/dopsd/test_evidence.py covers it)
    }
    values.update(overrides)
    return DOPSDConfig.for_preset(**values)


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step
        self.seen: list[StepState] = []

    def on_step_end(self, state: StepState) -> TrainerControl:
        self.seen.append(state)
        return TrainerControl(should_stop=state.step == self.step)


def test_resume_reaches_the_same_adapter_as_an_uninterrupted_run(example_dir: Path, tmp_path: Path) -> None:
    straight = train(quick_config(example_dir, tmp_path / "straight", train_batch_size=2))
    with pytest.raises(TrainingCancelled) as info:
        train(quick_config(example_dir, tmp_path / "resumed", train_batch_size=2), [StopAt(3)])
    assert info.value.step == 3 and info.value.checkpoint_dir is not None
    resumed = train(
        quick_config(example_dir, tmp_path / "resumed", train_batch_size=2, resume_from=str(tmp_path / "resumed"))
    )
    a, b = load_file(straight.adapter_path), load_file(resumed.adapter_path)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert resumed.metrics["loss"] == pytest.approx(straight.metrics["loss"], rel=1e-5)
    assert resumed.metrics["teacher_student_gap"]["before"] == straight.metrics["teacher_student_gap"]["before"]


def test_resume_refuses_a_checkpoint_of_another_shape(example_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingCancelled):
        train(quick_config(example_dir, tmp_path / "a"), [StopAt(1)])
    with pytest.raises(CheckpointError, match="rank"):
        train(quick_config(example_dir, tmp_path / "b", rank=4, resume_from=str(tmp_path / "a")))


def test_callbacks_get_progress_and_can_ask_for_checkpoints(example_dir: Path, tmp_path: Path) -> None:
    class SaveEvenSteps(TrainerCallback):
        def __init__(self) -> None:
            self.states: list[StepState] = []
            self.checkpoints: list[int] = []
            self.samples: list[int] = []
            self.finals: list[bool] = []

        def on_step_end(self, state: StepState) -> TrainerControl:
            self.states.append(state)
            return TrainerControl(should_save=state.step % 2 == 0)

        def on_checkpoint(self, step: int, path: Path) -> None:
            self.checkpoints.append(step)
            assert (path / "student.safetensors").is_file() and (path / "optimizer.pt").is_file()

        def on_samples(self, samples: SampleSet) -> None:
            self.samples.append(samples.step)
            self.finals.append(samples.final)
            assert samples.contact_sheet.is_file() and all(i.path.is_file() for i in samples.images)

    cb = SaveEvenSteps()
    train(quick_config(example_dir, tmp_path, sample_every=3, checkpoints_total_limit=2), [cb])
    assert [s.step for s in cb.states] == [1, 2, 3, 4, 5, 6]
    assert all(s.total_steps == 6 and s.loss > 0 and s.eta_s >= 0 for s in cb.states)
    assert cb.states[-1].eta_s == 0
    assert cb.checkpoints == [2, 4, 6]
    assert cb.samples == [3, 6] and cb.finals == [False, True]
    # Only the newest two checkpoints stay on disk, and no temporary folder is left behind.
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000004", "step-00000006"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"teacher_mode": "frozen"},
        {"teacher_mode": "live"},
        {"loss_space": "velocity"},
        {"rollout_schedule": "native"},
        {"train_batch_size": 2, "gradient_accumulation_steps": 2},
    ],
    ids=["frozen", "live", "velocity", "native", "batch2-accum2"],
)
def test_method_options_train(example_dir: Path, tmp_path: Path, overrides: dict[str, Any]) -> None:
    result = train(quick_config(example_dir, tmp_path, max_train_steps=3, **overrides))
    assert len(result.metrics["loss"]) == 3
    assert all(torch.isfinite(torch.tensor(result.metrics["loss"])))
    assert result.adapter_path.is_file()


@pytest.fixture
def adapted_family() -> Any:
    preset = get_preset("tiny-z-image")
    fam = load_family(
        preset, base=preset.base_model, teacher=preset.teacher_encoder, device=torch.device("cpu"),
        dtype=torch.float32, teacher_min_pixels=1024, teacher_max_pixels=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    add_adapters(fam.transformer, make_lora_config(4, 8.0, 0.0, fam.lora_target_modules), with_teacher=True)
    return fam


def test_adapters_start_as_the_base_model_and_only_the_student_learns(adapted_family: Any) -> None:
    fam = adapted_family
    transformer = fam.transformer
    student, teacher = student_parameters(transformer), teacher_parameters(transformer)
    assert len(student) == len(teacher) > 0
    for s, t in zip(student, teacher, strict=True):
        torch.testing.assert_close(s, t)
    base = [p.detach().clone() for n, p in transformer.named_parameters() if "lora_" not in n]
    cond = fam.encode_student(["a photo of sks"], 512)
    from PIL import Image

    t_cond = [
        fam.encode_teacher(
            Image.new("RGB", (64, 64), "red"), "a photo of sks", text_max_length=512, context_max_length=1024
        )
    ]
    noise = torch.randn(1, *fam.latent_shape(64, 64), generator=torch.Generator().manual_seed(0))
    loss = distillation_rollout(
        fam, noise=noise, student_conds=cond, teacher_conds=t_cond, sigmas=[1.0, 0.9, 0.75, 0.5, 0.0],
        teacher_adapter=TEACHER_ADAPTER, loss_space="x0", loss_scale=1.0,
    )  # fmt: skip
    assert loss > 0
    # Gradients reach the student's B matrices (A gets none while B is zero) and nothing else.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student)
    assert all(p.grad is None for p in teacher)
    assert all(p.grad is None for n, p in transformer.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for p in student) and not any(p.requires_grad for p in teacher)
    optimizer = torch.optim.AdamW(student, lr=1e-2)
    optimizer.step()
    after = [p.detach() for n, p in transformer.named_parameters() if "lora_" not in n]
    assert all(torch.equal(a, b) for a, b in zip(base, after, strict=True))
    # EMA moves the teacher a (1 - decay) fraction of the way toward the student.
    moved = [
        (i, s.detach().clone(), t.detach().clone())
        for i, (s, t) in enumerate(zip(student, teacher, strict=False))
        if not torch.equal(s, t)
    ]
    assert moved
    ema_update(teacher, student, 0.9)
    for i, s, t in moved:
        torch.testing.assert_close(teacher[i].detach(), 0.9 * t + 0.1 * s)
    assert transformer.active_adapters() == [STUDENT_ADAPTER]


def test_a_loaded_model_can_be_reused_across_runs(example_dir: Path, tmp_path: Path) -> None:
    """A worker keeps the base model between jobs: the second run must equal a run on a fresh model."""
    preset = get_preset("tiny-z-image")
    fam = load_family(
        preset, base=preset.base_model, teacher=preset.teacher_encoder, device=torch.device("cpu"),
        dtype=torch.float32, teacher_min_pixels=1024, teacher_max_pixels=4096,
    )  # fmt: skip
    train(quick_config(example_dir, tmp_path / "first", max_train_steps=2, seed=1), family=fam)
    assert not getattr(fam.transformer, "peft_config", {}), "adapters must be removed after a run"
    reused = train(quick_config(example_dir, tmp_path / "second", max_train_steps=2), family=fam)
    fresh = train(quick_config(example_dir, tmp_path / "fresh", max_train_steps=2))
    a, b = load_file(reused.adapter_path), load_file(fresh.adapter_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_both_adapters_stay_fp32_on_bf16_weights() -> None:
    """An EMA step of 1e-4 would round away in bf16: teacher (and student) LoRA weights are kept in fp32."""
    from dopsd.models.tiny import build_tiny_z_image_transformer

    transformer = build_tiny_z_image_transformer().to(torch.bfloat16)
    add_adapters(transformer, make_lora_config(4, 8.0, 0.1, ("attention.to_q",)), with_teacher=True)
    student, teacher = student_parameters(transformer), teacher_parameters(transformer)
    assert {p.dtype for p in student + teacher} == {torch.float32}
    before = [t.detach().clone() for t in teacher]
    with torch.no_grad():
        for p in student:
            p.add_(1.0)
    ema_update(teacher, student, 0.9999)
    assert all(not torch.equal(a, b) for a, b in zip(before, teacher, strict=True))
    assert transformer.peft_config[TEACHER_ADAPTER].lora_dropout == 0.0
    assert transformer.peft_config[STUDENT_ADAPTER].lora_dropout == 0.1


def test_the_gradient_norm_is_reported_per_step_and_kept_across_a_resume(example_dir: Path, tmp_path: Path) -> None:
    """`StepState.grad_norm` is the student's gradient norm before clipping; metrics.json lists it per step."""
    straight_cb = StopAt(-1)
    straight = train(quick_config(example_dir, tmp_path / "straight", max_grad_norm=1e-6), [straight_cb])
    norms = [s.grad_norm for s in straight_cb.seen]
    assert len(norms) == 6 and all(n is not None and n > 1e-6 for n in norms)  # measured before the clip
    assert straight.metrics["grad_norm"] == pytest.approx(norms)
    assert json.loads((straight.output_dir / "metrics.json").read_text())["grad_norm"] == pytest.approx(norms)
    with pytest.raises(TrainingCancelled):
        train(quick_config(example_dir, tmp_path / "resumed", max_grad_norm=1e-6), [StopAt(3)])
    resumed = train(
        quick_config(example_dir, tmp_path / "resumed", max_grad_norm=1e-6, resume_from=str(tmp_path / "resumed"))
    )
    assert resumed.metrics["grad_norm"] == pytest.approx(norms, rel=1e-5)
    unclipped = train(quick_config(example_dir, tmp_path / "unclipped", max_train_steps=2, max_grad_norm=0.0))
    assert all(n is not None and n > 0 for n in unclipped.metrics["grad_norm"])


def test_a_failure_after_training_leaves_the_adapter(example_dir: Path, tmp_path: Path) -> None:
    """The adapter and config.json are written before the final samples render: a failure there loses nothing."""

    class FailOnFinalSamples(TrainerCallback):
        def on_samples(self, samples: SampleSet) -> None:
            if samples.final:
                raise RuntimeError("the sample upload failed")

    with pytest.raises(RuntimeError, match="the sample upload failed"):
        train(quick_config(example_dir, tmp_path, max_train_steps=2), [FailOnFinalSamples()])
    adapter = tmp_path / "pytorch_lora_weights.safetensors"
    assert adapter.is_file() and load_file(adapter)
    assert DOPSDConfig.load(tmp_path / "config.json").max_train_steps == 2
    assert not (tmp_path / "metrics.json").exists()  # written last, once everything is known
