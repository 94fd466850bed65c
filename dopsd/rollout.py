"""The on-policy roll-out: the student walks its own few-step trajectory, and is pulled toward the teacher
at every state it visits (per-step detach, no back-propagation through time)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dopsd.config import DISTILL4_SIGMAS
from dopsd.lora import active_adapter
from dopsd.losses import compute_velocity_distillation_loss, compute_x0_distillation_loss
from dopsd.models.base import Cond, ModelFamily


ROLLOUT_SCHEDULES = ("distill4", "native", "released")


def rollout_sigmas(family: ModelFamily, schedule: str, *, width: int, height: int, native_steps: int) -> list[float]:
    """The sigmas (1 = noise, ending with 0) a training roll-out of a `width` x `height` bucket walks.

    `distill4`: 1, .9, .75, .5 -> 0 at every size; `native`: the family's pipeline schedule at `native_steps`;
    `released`: the authors' released training script's schedule for the family (Z-Image: distill4; klein:
    `set_timesteps(4, mu)` without explicit sigmas).
    """
    if schedule == "distill4":
        return list(DISTILL4_SIGMAS)
    if schedule == "native":
        return family.native_sigmas(native_steps, width, height)
    if schedule == "released":
        return family.released_sigmas(width, height)
    raise ValueError(f"unknown roll-out schedule {schedule!r}; use one of {', '.join(ROLLOUT_SCHEDULES)}")


def distillation_rollout(
    family: ModelFamily,
    *,
    noise: torch.Tensor,
    student_conds: Sequence[Cond],
    teacher_conds: Sequence[Cond],
    sigmas: Sequence[float],
    teacher_adapter: str | None,
    loss_space: str,
    loss_scale: float,
) -> float:
    """Runs one K-step roll-out from `noise`, back-propagates the per-state losses, returns the mean loss.

    At each state the teacher (adapter `teacher_adapter`, no grad, multimodal context) and the student (text-only
    context, with grad) predict at the student's latents; the loss is their x0 (or velocity) MSE; the student then
    takes its own Euler step. Each state's loss is back-propagated at once: the states are detached from each other,
    so this equals one backward of the mean while holding only one graph in memory. `loss_scale` divides for
    gradient accumulation.
    """
    transformer = family.transformer
    num_states = len(sigmas) - 1
    total = 0.0
    x = noise
    with family.lora_inputs_uncast():  # one switch for the roll-out, backward included
        for k in range(num_states):
            x = x.detach()
            sigma, sigma_next = sigmas[k], sigmas[k + 1]
            with torch.no_grad(), active_adapter(transformer, teacher_adapter), family.autocast():
                pred_teacher = family.predict(x, sigma, teacher_conds)
            with family.autocast():
                pred_student = family.predict(x, sigma, student_conds)
            if loss_space == "x0":
                loss = compute_x0_distillation_loss(
                    family.x0_from_prediction(x, sigma, pred_student),
                    family.x0_from_prediction(x, sigma, pred_teacher),
                )
            else:
                loss = compute_velocity_distillation_loss(pred_student, pred_teacher)
            (loss * (loss_scale / num_states)).backward()
            total += float(loss.detach())
            x = family.euler_step(x, sigma, sigma_next, pred_student.detach())
    return total / num_states


@torch.no_grad()
def teacher_student_gap(
    family: ModelFamily,
    *,
    noises: Sequence[torch.Tensor],
    student_conds: Sequence[Cond],
    teacher_conds: Sequence[Cond],
    sigmas: Sequence[float],
    teacher_adapter: str | None,
) -> float:
    """Mean x0 distance between student and teacher along the student's own roll-out.

    `noises[i]` ([1, ...]) is rolled out with `student_conds[i]` / `teacher_conds[i]`; the result averages the
    per-state x0 MSE over states and samples. Fixed held-out noise makes before/after values comparable.
    """
    transformer = family.transformer
    values: list[float] = []
    for noise, s_cond, t_cond in zip(noises, student_conds, teacher_conds, strict=True):
        x = noise
        for k in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[k], sigmas[k + 1]
            with active_adapter(transformer, teacher_adapter), family.autocast():
                pred_teacher = family.predict(x, sigma, [t_cond])
            with family.autocast():
                pred_student = family.predict(x, sigma, [s_cond])
            x0_s = family.x0_from_prediction(x, sigma, pred_student)
            x0_t = family.x0_from_prediction(x, sigma, pred_teacher)
            values.append(float(compute_x0_distillation_loss(x0_s, x0_t)))
            x = family.euler_step(x, sigma, sigma_next, pred_student)
    return sum(values) / len(values)
