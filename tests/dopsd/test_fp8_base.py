"""FP8 matmuls of the frozen base (`fp8_base`, torchao's float8 training), on the CPU with FP8 emulated: on the same
batch and noise, a D-OPSD roll-out's loss and the student's LoRA gradients stay close to the full-precision ones
(measured below), the LoRA layers themselves are untouched, and the base's layers come back as they were."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dopsd import DOPSDConfig, train
from dopsd.config import DISTILL4_SIGMAS
from dopsd.fast_path import fp8_base_layers, restore_linear_layers
from dopsd.lora import TEACHER_ADAPTER, add_adapters, make_lora_config, remove_adapters, student_parameters
from dopsd.models.loading import load_family_for
from dopsd.rollout import distillation_rollout
from tests.dopsd.test_distributed import one_thread, run_settings


# Measured on the tiny preset (23 base layers in FP8; one roll-out of 4 states at 64 px, rank 8): the loss within
# 4.0% of full precision, the LoRA gradient at cosine 0.991 to the full-precision one, its norm within 2.2%. FP8
# e4m3 keeps 3 mantissa bits (a rounding of up to 6% per element), which mostly averages out over each matmul's
# sums; the tiny model's 64-wide layers average less than a real model's 3840-wide ones.
LOSS_RTOL = 0.1
GRADIENT_COSINE = 0.95
NORM_RTOL = 0.1


def test_fp8_base_keeps_the_loss_and_the_lora_gradients_and_comes_back() -> None:
    cfg = DOPSDConfig.for_preset("tiny-z-image")
    family = load_family_for(cfg, device=torch.device("cpu"), dtype=torch.float32)
    torch.manual_seed(0)
    add_adapters(family.transformer, make_lora_config(8, 16.0, 0.0, family.lora_target_modules), with_teacher=True)
    params = student_parameters(family.transformer)
    with torch.no_grad():  # a student a few steps in: non-zero B, so the gradients reach every LoRA weight
        for p in params:
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    student = family.encode_student(["a photo of sks"], 64)
    teacher = family.encode_student(["a photo of sks, in detail"], 64)
    noise = torch.randn(1, *family.latent_shape(64, 64), generator=torch.Generator().manual_seed(1))

    def rollout() -> tuple[float, torch.Tensor]:
        for p in params:
            p.grad = None
        with one_thread():
            loss = distillation_rollout(
                family, noise=noise, student_conds=student, teacher_conds=teacher, sigmas=list(DISTILL4_SIGMAS),
                teacher_adapter=TEACHER_ADAPTER, loss_space="x0", loss_scale=1.0,
            )  # fmt: skip
        return loss, torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])

    exact_loss, exact_grad = rollout()
    linear_before = {name: type(m) for name, m in family.transformer.named_modules()}
    converted = fp8_base_layers(family.transformer, emulate=True)
    assert converted > 0
    assert all("lora_" not in n for n, m in family.transformer.named_modules() if type(m).__name__ == "Float8Linear")
    fp8_loss, fp8_grad = rollout()
    assert abs(fp8_loss - exact_loss) <= LOSS_RTOL * exact_loss
    cosine = float(torch.nn.functional.cosine_similarity(fp8_grad, exact_grad, dim=0))
    assert cosine >= GRADIENT_COSINE
    assert abs(float(fp8_grad.norm()) / float(exact_grad.norm()) - 1) <= NORM_RTOL
    assert restore_linear_layers(family.transformer) == converted
    assert {name: type(m) for name, m in family.transformer.named_modules()} == linear_before
    again_loss, again_grad = rollout()
    assert again_loss == exact_loss and torch.equal(again_grad, exact_grad)
    remove_adapters(family.transformer)


def test_a_run_with_fp8_base_trains_and_leaves_the_cached_model_plain(tmp_path: Path, example_dir: Path) -> None:
    cfg = DOPSDConfig.for_preset(**run_settings(tmp_path, example_dir, max_train_steps=2, fp8_base=True))
    family = load_family_for(cfg, device=torch.device("cpu"), dtype=torch.float32)
    with one_thread():
        result = train(cfg, family=family)
    assert result.metrics["steps"] == 2 and all(math.isfinite(v) for v in result.metrics["loss"])
    assert not any(type(m).__name__ == "Float8Linear" for m in family.transformer.modules())


def test_fp8_base_is_for_lora_runs() -> None:
    with pytest.raises(ValueError, match="`fp8_base` runs a frozen base in FP8"):
        DOPSDConfig.for_preset("tiny-z-image", finetune="full", fp8_base=True)
