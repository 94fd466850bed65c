"""Released-code parity (issue 13, item 3), each pinned so that undoing it fails a test: the klein edit-branch
instruction verbatim, the klein roll-out schedule switch, the EMA pairing by name, the resume fingerprint, and
that the loss-space, teacher-mode and schedule options change what is computed (not only that a loss is finite)."""

from __future__ import annotations

import itertools
import json
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import dopsd.trainer as trainer_module
from dopsd import DOPSDConfig, StepState, TrainerCallback, TrainerControl, TrainingCancelled, train
from dopsd.checkpoint import (
    FINGERPRINT_FILE,
    TRAINING_FIELDS,
    TrainerState,
    dataset_digest,
    load_checkpoint,
    save_checkpoint,
    training_fingerprint,
)
from dopsd.config import DISTILL4_SIGMAS, RolloutSchedule
from dopsd.data import ConceptDataset, ConceptItem
from dopsd.errors import CheckpointError
from dopsd.lora import (
    STUDENT_ADAPTER,
    TEACHER_ADAPTER,
    AdapterParameters,
    active_adapter,
    add_adapters,
    ema_update,
    make_lora_config,
    student_parameters,
    teacher_adapter_for,
    teacher_parameters,
)
from dopsd.models.base import Cond, ModelFamily
from dopsd.models.flux2_klein import Flux2KleinFamily, teacher_edit_prompt
from dopsd.models.loading import load_family
from dopsd.presets import get_preset
from dopsd.rollout import distillation_rollout, rollout_sigmas


RELEASED_EDIT_INSTRUCTION = (
    "Make the main subject (facial/ip details), background, and overall composition consistent with the reference "
    "image."
)
DISTILL4_WEIGHTS = (1.0, 0.81, 0.5625, 0.25)  # sigma^2 on the four distill4 states


def tiny_family(preset_name: str) -> ModelFamily:
    preset = get_preset(preset_name)
    context = "edit" if preset.family == "flux2_klein" else "vlm"
    return load_family(
        preset, base=preset.base_model, teacher=preset.teacher_encoder, device=torch.device("cpu"),
        dtype=torch.float32, teacher_min_pixels=32 * 32, teacher_max_pixels=64 * 64, teacher_context=context,
    )  # fmt: skip


def with_adapters(family: ModelFamily) -> ModelFamily:
    torch.manual_seed(0)
    add_adapters(family.transformer, make_lora_config(4, 8.0, 0.0, family.lora_target_modules), with_teacher=True)
    return family


def conds(family: ModelFamily, caption: str = "a photo of sks") -> tuple[list[Cond], list[Cond]]:
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    student = family.encode_student([caption], 64)
    teacher = family.encode_teacher(image, caption, text_max_length=64, context_max_length=1024)
    return student, [teacher]


@dataclass
class Call:
    sigma: float
    latents: torch.Tensor
    output: torch.Tensor
    with_grad: bool


@pytest.fixture
def spy() -> Iterator[Callable[[ModelFamily], list[Call]]]:
    """Wraps a family's `predict` to record every call: sigma, input latents, output, whether grad was on."""
    patched: list[ModelFamily] = []

    def install(family: ModelFamily) -> list[Call]:
        calls: list[Call] = []
        original = family.predict

        def recording(latents: torch.Tensor, sigma: float, conds: Sequence[Cond]) -> torch.Tensor:
            out = original(latents, sigma, conds)
            calls.append(Call(sigma, latents.detach().clone(), out.detach().clone(), torch.is_grad_enabled()))
            return out

        family.predict = recording  # type: ignore[method-assign]
        patched.append(family)
        return calls

    yield install
    for family in patched:
        del family.predict  # back to the class's method


# 1. The FLUX.2-klein edit-branch instruction, verbatim.


def test_klein_edit_teacher_prompt_is_the_released_instruction_verbatim() -> None:
    family = tiny_family("tiny-flux2-klein")
    assert isinstance(family, Flux2KleinFamily) and family.teacher_context == "edit"
    caption = "a photo of sks toy robot"
    released_prompt = f"{caption} {RELEASED_EDIT_INSTRUCTION}"
    assert teacher_edit_prompt(caption) == released_prompt
    # The tiny tokenizer spends a token per byte: 256 tokens hold the whole prompt, so every character counts.
    assert len(family.pipeline.tokenizer(released_prompt)["input_ids"]) < 200
    teacher = family.encode_teacher(Image.new("RGB", (64, 64), "red"), caption, text_max_length=256,
                                    context_max_length=1024)  # fmt: skip
    # What reaches the teacher is exactly the released prompt's text features, and not the bare caption's.
    torch.testing.assert_close(teacher.embeds, family.encode_student([released_prompt], 256)[0].embeds)
    assert not torch.allclose(teacher.embeds, family.encode_student([caption], 256)[0].embeds)
    assert not torch.allclose(teacher.embeds, family.encode_student([released_prompt[:-1]], 256)[0].embeds)


# 2. The klein roll-out schedule: released `set_timesteps(4, mu)` vs the pipeline's own sigmas.


def test_klein_released_and_native_schedules_at_one_megapixel() -> None:
    family = tiny_family("tiny-flux2-klein")  # the tiny scheduler has klein's config: shift 3, dynamic, exponential
    released = rollout_sigmas(family, "released", width=1024, height=1024, native_steps=4)
    native = rollout_sigmas(family, "native", width=1024, height=1024, native_steps=4)
    assert released == pytest.approx([1.0, 0.952, 0.832, 0.0098, 0.0], abs=5e-4)
    assert native == pytest.approx([1.0, 0.967, 0.908, 0.767, 0.0], abs=5e-4)
    assert released == family.released_sigmas(1024, 1024)
    assert native == family.native_sigmas(4, 1024, 1024)
    # Both depend on the bucket's token count through the empirical mu.
    assert family.released_sigmas(64, 64) != released
    assert rollout_sigmas(family, "distill4", width=1024, height=1024, native_steps=4) == list(DISTILL4_SIGMAS)


def test_z_image_released_schedule_is_distill4_and_unknown_schedules_are_refused() -> None:
    family = tiny_family("tiny-z-image")
    for width, height in ((64, 64), (1024, 1024), (1344, 576)):
        assert rollout_sigmas(family, "released", width=width, height=height, native_steps=8) == list(DISTILL4_SIGMAS)
    with pytest.raises(ValueError, match="unknown roll-out schedule 'linear'"):
        rollout_sigmas(family, "linear", width=64, height=64, native_steps=8)


# 3. `ema_update` pairs teacher and student by name, strictly.


def test_ema_pairs_by_name_whatever_the_order() -> None:
    family = with_adapters(tiny_family("tiny-z-image"))
    student, teacher = student_parameters(family.transformer), teacher_parameters(family.transformer)
    assert student.names == teacher.names and len(set(student.names)) == len(student) > 2
    assert not any(STUDENT_ADAPTER in n or TEACHER_ADAPTER in n for n in student.names)
    with torch.no_grad():
        for p in student:
            p.normal_()
    before = {n: t.detach().clone() for n, t in teacher.named().items()}
    shuffled = list(zip(student.names, student, strict=True))[::-1]
    shuffled = shuffled[1::2] + shuffled[::2]  # different order, and neighbours of different shapes swapped
    assert [n for n, _ in shuffled] != list(student.names)
    ema_update(teacher, AdapterParameters(shuffled), 0.75)
    for name, t in teacher.named().items():
        torch.testing.assert_close(t.detach(), 0.75 * before[name] + 0.25 * student.named()[name].detach())


def test_ema_refuses_missing_extra_or_misshapen_names() -> None:
    teacher = {"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.zeros(3, 2)}
    student = {"a.lora_B.weight": torch.ones(3, 2), "a.lora_A.weight": torch.ones(2, 3)}
    ema_update(teacher, student, 0.5)  # a mapping in another order is fine
    torch.testing.assert_close(teacher["a.lora_A.weight"], torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match=r"missing in student: a\.lora_B\.weight"):
        ema_update(teacher, {"a.lora_A.weight": torch.ones(2, 3)}, 0.5)
    with pytest.raises(ValueError, match=r"missing in teacher: b\.lora_A\.weight"):
        ema_update(teacher, {**student, "b.lora_A.weight": torch.ones(1)}, 0.5)
    with pytest.raises(ValueError, match=r"shape mismatch: a\.lora_A\.weight"):
        ema_update(teacher, {**student, "a.lora_A.weight": torch.ones(3, 2)}, 0.5)
    with pytest.raises(TypeError, match="by name"):
        ema_update(list(teacher.values()), list(student.values()), 0.5)  # type: ignore[arg-type]
    torch.testing.assert_close(teacher["a.lora_A.weight"], torch.full((2, 3), 0.5))  # refused calls change nothing


# 4. A resume refuses a checkpoint whose training-relevant config or data differ.


def concept(pixel: int = 10, caption: str = "a photo of sks") -> ConceptDataset:
    item = ConceptItem(name="a.png", image=Image.new("RGB", (32, 32), (pixel, 20, 30)), captions=(caption,))
    return ConceptDataset(items=(item,), trigger="sks")


def test_dataset_digest_follows_pixels_and_captions() -> None:
    assert dataset_digest(concept()) == dataset_digest(concept())
    assert dataset_digest(concept(pixel=11)) != dataset_digest(concept())
    assert dataset_digest(concept(caption="a photo of sks dog")) != dataset_digest(concept())


def tiny_config(out: Path, **given: Any) -> DOPSDConfig:
    return DOPSDConfig.for_preset("tiny-z-image", output_dir=str(out), **given)


def write_checkpoint(root: Path, config: DOPSDConfig, digest: str | None) -> Path:
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    return save_checkpoint(
        root, state=TrainerState(step=1, data_rng=None), student={"w": weight.detach()}, teacher=None,
        optimizer=optimizer, noise_rng=torch.Generator().manual_seed(0), config=config, keep=2, dataset_sha256=digest,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"learning_rate": 1e-3}, "learning_rate"),
        ({"loss_space": "velocity"}, "loss_space"),
        ({"rollout_schedule": "native"}, "rollout_schedule"),
        ({"teacher_mode": "frozen"}, "teacher_mode"),
        ({"ema_decay": 0.999}, "ema_decay"),
        ({"rank": 4}, "rank"),
        ({"lora_alpha": 4.0}, "lora_alpha"),
    ],
)
def test_resume_refuses_another_training_config(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    digest = dataset_digest(concept())
    path = write_checkpoint(tmp_path, tiny_config(tmp_path), digest)
    saved = json.loads((path / FINGERPRINT_FILE).read_text())
    assert saved == training_fingerprint(tiny_config(tmp_path).to_dict(), digest)
    assert set(saved) == {*TRAINING_FIELDS, "dataset"}
    with pytest.raises(CheckpointError, match=rf"does not match this run: {field} \(") as info:
        load_checkpoint(path, tiny_config(tmp_path, **change), digest)
    assert str(info.value).count("in checkpoint") == 1  # names exactly the one field that differs
    # Paths and step counts are not training settings: another folder and a longer run resume fine.
    other = tiny_config(tmp_path / "elsewhere", max_train_steps=500, instance_data_dir=str(tmp_path))
    assert load_checkpoint(path, other, digest).state.step == 1


def test_resume_refuses_another_preset_and_other_data(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, tiny_config(tmp_path), dataset_digest(concept()))
    with pytest.raises(CheckpointError, match=r"dataset \(images or captions differ"):
        load_checkpoint(path, tiny_config(tmp_path), dataset_digest(concept(caption="a photo of sks cat")))
    with pytest.raises(CheckpointError, match=r"preset \('tiny-z-image' in checkpoint, 'tiny-flux2-klein' now\)"):
        load_checkpoint(path, DOPSDConfig.for_preset("tiny-flux2-klein", output_dir=str(tmp_path)),
                        dataset_digest(concept()))  # fmt: skip


def test_a_checkpoint_without_fingerprint_is_checked_by_its_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_checkpoint(tmp_path, tiny_config(tmp_path), dataset_digest(concept()))
    (path / FINGERPRINT_FILE).unlink()  # as written before fingerprints existed
    with caplog.at_level("WARNING", logger="dopsd.checkpoint"):
        assert load_checkpoint(path, tiny_config(tmp_path), dataset_digest(concept())).state.step == 1
    assert "no training fingerprint" in caplog.text
    with pytest.raises(CheckpointError, match="learning_rate"):
        load_checkpoint(path, tiny_config(tmp_path, learning_rate=1e-3), dataset_digest(concept()))


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state: StepState) -> TrainerControl:
        return TrainerControl(should_stop=state.step == self.step)


def test_the_trainer_refuses_to_resume_with_another_learning_rate(example_dir: Path, tmp_path: Path) -> None:
    def config(**given: Any) -> DOPSDConfig:
        return tiny_config(tmp_path, instance_data_dir=str(example_dir), max_train_steps=3,
                           validation_prompts=["[V]"], sample_seeds=[0], gap_eval_seeds=0, **given)  # fmt: skip

    with pytest.raises(TrainingCancelled):
        train(config(), [StopAt(1)])
    with pytest.raises(CheckpointError, match=r"learning_rate \(0\.002 in checkpoint, 0\.0005 now\)"):
        train(config(learning_rate=5e-4, resume_from=str(tmp_path)))


# 5. The options change what is computed.


def states_along(family: ModelFamily, noise: torch.Tensor, student: Sequence[Cond], sigmas: Sequence[float]) -> list[
    torch.Tensor
]:  # fmt: skip
    """The student's own roll-out states x_0 .. x_{K-1} (what the training roll-out visits)."""
    x, states = noise, []
    with torch.no_grad():
        for sigma, sigma_next in itertools.pairwise(sigmas):
            states.append(x)
            x = family.euler_step(x, sigma, sigma_next, family.predict(x, sigma, student))
    return states


def rollout_loss_and_grad(
    family: ModelFamily, noise: torch.Tensor, pair: tuple[list[Cond], list[Cond]], sigmas: Sequence[float], space: str
) -> tuple[float, torch.Tensor]:
    params = student_parameters(family.transformer)
    for p in params:
        p.grad = None
    loss = distillation_rollout(
        family, noise=noise, student_conds=pair[0], teacher_conds=pair[1], sigmas=list(sigmas),
        teacher_adapter=TEACHER_ADAPTER, loss_space=space, loss_scale=1.0,
    )  # fmt: skip
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    return loss, grad


@pytest.mark.parametrize("preset_name", ["tiny-z-image", "tiny-flux2-klein"])
def test_x0_loss_is_the_velocity_loss_weighted_by_sigma_squared(preset_name: str) -> None:
    """On each distill4 state, x0-MSE = sigma^2 v-MSE (weights 1, .81, .5625, .25), in loss and in gradient."""
    family = with_adapters(tiny_family(preset_name))
    pair = conds(family)
    noise = torch.randn((1, *family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(3))
    sigmas = list(DISTILL4_SIGMAS)
    per_state_v = []
    for k, x in enumerate(states_along(family, noise, pair[0], sigmas)):
        one_state = sigmas[k : k + 2]
        loss_x0, grad_x0 = rollout_loss_and_grad(family, x, pair, one_state, "x0")
        loss_v, grad_v = rollout_loss_and_grad(family, x, pair, one_state, "velocity")
        assert loss_v > 0 and grad_v.abs().sum() > 0
        assert loss_x0 / loss_v == pytest.approx(DISTILL4_WEIGHTS[k], rel=1e-4)
        # Elementwise, relative to the gradient's scale: a near-zero element differs by fp32 rounding alone.
        scale = float(grad_v.abs().max())
        torch.testing.assert_close(grad_x0, DISTILL4_WEIGHTS[k] * grad_v, rtol=1e-4, atol=1e-5 * scale)
        per_state_v.append(loss_v)
    # The whole roll-out averages the per-state losses with those weights (x0) or without them (velocity).
    full_x0, _ = rollout_loss_and_grad(family, noise, pair, sigmas, "x0")
    full_v, _ = rollout_loss_and_grad(family, noise, pair, sigmas, "velocity")
    expected_x0 = sum(w * v for w, v in zip(DISTILL4_WEIGHTS, per_state_v, strict=True)) / 4
    assert full_x0 == pytest.approx(expected_x0, rel=1e-4)
    assert full_v == pytest.approx(sum(per_state_v) / 4, rel=1e-4)
    assert full_x0 != pytest.approx(full_v, rel=1e-2)


def test_teacher_modes_use_different_teachers(spy: Callable[[ModelFamily], list[Call]]) -> None:
    """After an optimizer step and an EMA step: `frozen` is the base model, `live` the student, `ema` neither."""
    base = tiny_family("tiny-z-image")  # a second copy that never gets adapters: the base model itself
    family = with_adapters(tiny_family("tiny-z-image"))
    student, teacher = student_parameters(family.transformer), teacher_parameters(family.transformer)
    pair = conds(family)
    noise = torch.randn((1, *family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(student, lr=5e-2)
    distillation_rollout(
        family, noise=noise, student_conds=pair[0], teacher_conds=pair[1], sigmas=list(DISTILL4_SIGMAS),
        teacher_adapter=TEACHER_ADAPTER, loss_space="x0", loss_scale=1.0,
    )  # fmt: skip
    optimizer.step()
    ema_update(teacher, student, 0.5)
    sigma = 0.75
    with torch.no_grad():
        base_pred = base.predict(noise, sigma, pair[1])
        student_pred = family.predict(noise, sigma, pair[1])  # the student adapter on the teacher's context
    assert not torch.allclose(base_pred, student_pred, atol=1e-5)

    calls = spy(family)
    teacher_pred: dict[str, torch.Tensor] = {}
    for mode in ("ema", "frozen", "live"):
        calls.clear()
        for p in student:
            p.grad = None
        distillation_rollout(
            family, noise=noise, student_conds=pair[0], teacher_conds=pair[1], sigmas=[sigma, 0.0],
            teacher_adapter=teacher_adapter_for(mode), loss_space="x0", loss_scale=1.0,
        )  # fmt: skip
        (teacher_call,) = [c for c in calls if not c.with_grad]
        teacher_pred[mode] = teacher_call.output
        assert family.transformer.active_adapters() == [STUDENT_ADAPTER]
        assert all(p.grad is None for p in teacher) and any(p.grad is not None for p in student)
    torch.testing.assert_close(teacher_pred["frozen"], base_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher_pred["live"], student_pred, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), active_adapter(family.transformer, TEACHER_ADAPTER):
        torch.testing.assert_close(teacher_pred["ema"], family.predict(noise, sigma, pair[1]))
    for a, b in itertools.combinations(("ema", "frozen", "live"), 2):
        assert not torch.allclose(teacher_pred[a], teacher_pred[b], atol=1e-5), (a, b)
    with pytest.raises(ValueError, match="unknown teacher mode 'copy'"):
        teacher_adapter_for("copy")


@pytest.mark.parametrize("preset_name", ["tiny-z-image", "tiny-flux2-klein"])
def test_the_model_is_called_at_exactly_the_given_sigmas(
    preset_name: str, spy: Callable[[ModelFamily], list[Call]]
) -> None:
    """Teacher (no grad) then student (grad) at each given sigma but the last, each at the student's own state."""
    family = with_adapters(tiny_family(preset_name))
    pair = conds(family)
    noise = torch.randn((1, *family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(2))
    released = rollout_sigmas(family, "released", width=64, height=64, native_steps=4)
    calls = spy(family)
    for sigmas in ([1.0, 0.8, 0.3, 0.05, 0.0], released):
        calls.clear()
        distillation_rollout(
            family, noise=noise, student_conds=pair[0], teacher_conds=pair[1], sigmas=sigmas,
            teacher_adapter=TEACHER_ADAPTER, loss_space="x0", loss_scale=1.0,
        )  # fmt: skip
        assert [c.sigma for c in calls] == [s for s in sigmas[:-1] for _ in range(2)]
        assert [c.with_grad for c in calls] == [False, True] * (len(sigmas) - 1)
        torch.testing.assert_close(calls[0].latents, noise)
        for k in range(len(sigmas) - 2):
            teacher_call, student_call, next_call = calls[2 * k], calls[2 * k + 1], calls[2 * k + 2]
            torch.testing.assert_close(teacher_call.latents, student_call.latents)
            stepped = family.euler_step(student_call.latents, sigmas[k], sigmas[k + 1], student_call.output)
            torch.testing.assert_close(next_call.latents, stepped)


@pytest.mark.parametrize("schedule", typing.get_args(RolloutSchedule))
def test_the_trainer_rolls_out_along_the_configured_schedule(
    schedule: str, example_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every model call of a klein run's roll-outs and gap metric is at a sigma of the configured schedule for its
    bucket, and every sigma of it is used: klein's distill4, native and released schedules all differ. (The
    evaluation and the teacher gate render on the inference schedule: their calls are not the roll-out's.)"""
    seen: list[tuple[float, int, int]] = []
    in_rollout = [False]
    original = Flux2KleinFamily.predict

    def recording(self: Flux2KleinFamily, latents: torch.Tensor, sigma: float, conds: Sequence[Cond]) -> torch.Tensor:
        if in_rollout[0]:
            seen.append((sigma, latents.shape[-1] * 16, latents.shape[-2] * 16))  # klein latents: 1/16 of the pixels
        return original(self, latents, sigma, conds)

    def marking(function: Any) -> Any:
        def marked(*args: Any, **kwargs: Any) -> Any:
            in_rollout[0] = True
            try:
                return function(*args, **kwargs)
            finally:
                in_rollout[0] = False

        return marked

    monkeypatch.setattr(Flux2KleinFamily, "predict", recording)
    monkeypatch.setattr(trainer_module, "distillation_rollout", marking(trainer_module.distillation_rollout))
    monkeypatch.setattr(trainer_module, "teacher_student_gap", marking(trainer_module.teacher_student_gap))
    config = DOPSDConfig.for_preset(
        "tiny-flux2-klein", instance_data_dir=str(example_dir), output_dir=str(tmp_path), max_train_steps=1,
        rollout_schedule=schedule, validation_prompts=["[V]"], sample_seeds=[0], gap_eval_seeds=1,
    )  # fmt: skip
    train(config)
    family = tiny_family("tiny-flux2-klein")
    buckets = {(w, h) for _, w, h in seen}
    expected = {
        (w, h): rollout_sigmas(family, schedule, width=w, height=h, native_steps=config.sample_steps)[:-1]
        for w, h in buckets
    }
    assert seen and all(sigma in expected[(w, h)] for sigma, w, h in seen)
    for bucket, sigmas in expected.items():
        assert {s for s, w, h in seen if (w, h) == bucket} == set(sigmas)
