"""The step-cost benchmark runs in quick mode; the teacher-batching lever it times computes what the trainer's
sequential roll-out computes."""

from __future__ import annotations

import pytest
import torch

from bench import step_cost
from bench.common import batched_rollout, encode_pair, target_image
from dopsd.config import DISTILL4_SIGMAS
from dopsd.lora import add_adapters, make_lora_config, student_parameters, teacher_parameters
from dopsd.rollout import distillation_rollout
from tests.bench.conftest import run_bench


KEYS = {
    "bench", "size", "dim", "layers", "resolution", "image_tokens", "dopsd_step_s", "sft_step_s", "ratio", "device",
    "torch", "threads", "repeats", "reference_step_s", "encode_s", "dopsd_over_sft", "reference_over_dopsd",
    "cpu_dopsd_over_sft", "cpu_reference_over_dopsd", "transformer_params", "text_encoder_params", "vision_params",
}  # fmt: skip


def test_quick_mode_prints_one_json_line_with_the_three_step_times() -> None:
    """`bench/step_cost.py --quick`: one tiny-size record; D-OPSD (4 teacher + 4 student passes) costs more than SFT,
    and the reference-style step (encoders every step) reports its ratio to the cached-feature step."""
    (record,) = run_bench("step_cost.py", "--quick")
    assert KEYS <= record.keys(), KEYS - record.keys()
    assert record["bench"] == "step_cost"
    assert record["size"] == "tiny"
    assert record["repeats"] == 2
    assert min(record["dopsd_step_s"], record["sft_step_s"], record["reference_step_s"], record["encode_s"]) > 0
    assert record["ratio"] == pytest.approx(record["dopsd_step_s"] / record["sft_step_s"], rel=1e-3, abs=1e-3)
    assert record["reference_over_dopsd"] == pytest.approx(
        record["reference_step_s"] / record["dopsd_step_s"], rel=1e-3, abs=1e-3
    )
    assert record["ratio"] > 1


def test_small_size_keeps_the_full_size_proportions() -> None:
    """The small size's encoders stand to its transformer as Qwen3-4B and Qwen3-VL-4B's vision tower stand to the
    6.15B Z-Image transformer (0.59x and 0.07x), within a tolerance."""
    size = step_cost.SIZES["small"]
    family = step_cost.build_size(size, torch.device("cpu"), torch.float32)
    dit = step_cost.parameter_count(family.transformer)
    text = step_cost.parameter_count(family.pipeline.text_encoder)
    assert family.teacher_encoder is not None
    vision = step_cost.parameter_count(family.teacher_encoder.vlm.visual)  # type: ignore[arg-type]
    assert 0.5 < text / dit < 0.7
    assert 0.04 < vision / dit < 0.1


@pytest.mark.parametrize("teacher_adapter", ["teacher", None, "student"])
def test_batched_rollout_matches_the_sequential_rollout(teacher_adapter: str | None) -> None:
    """One forward of [student rows; teacher rows] with a LoRA adapter per row (peft's mixed-batch path) gives the
    sequential roll-out's loss and the student's gradients, and no gradient reaches the teacher adapter."""
    size = step_cost.SIZES["tiny"]
    family = step_cost.build_size(size, torch.device("cpu"), torch.float32)
    conds = encode_pair(family, target_image(size.resolution), "a photo of sks", text_max_length=96,
                        context_max_length=1024)  # fmt: skip
    transformer = family.transformer
    torch.manual_seed(0)
    add_adapters(transformer, make_lora_config(8, 16, 0.0, family.lora_target_modules), with_teacher=True)
    student, teacher = student_parameters(transformer), teacher_parameters(transformer)
    with torch.no_grad():  # three different models: base, teacher, student
        for p in student + teacher:
            p.add_(0.05 * torch.randn_like(p))
    noise = torch.randn((1, *family.latent_shape(size.resolution, size.resolution)))
    sigmas = list(DISTILL4_SIGMAS)
    sequential = distillation_rollout(
        family, noise=noise, student_conds=conds[0], teacher_conds=conds[1], sigmas=sigmas,
        teacher_adapter=teacher_adapter, loss_space="x0", loss_scale=1.0,
    )  # fmt: skip
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in student]
    for p in student:
        p.grad = None
    batched = batched_rollout(
        family, noise=noise, student_conds=conds[0], teacher_conds=conds[1], sigmas=sigmas,
        teacher_adapter=teacher_adapter,
    )  # fmt: skip
    assert batched == pytest.approx(sequential, rel=1e-5)
    for p, g in zip(student, grads, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in teacher)
