"""Pure loss functions of D-OPSD (arXiv 2605.05204): no model, no state, shapes in the docstrings."""

from __future__ import annotations

import torch


def compute_x0_distillation_loss(x0_student: torch.Tensor, x0_teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's and the teacher's x0 predictions at one roll-out state.

    `mean((x0_S - x0_T)^2)`, the released code's loss. With x0 = x_t - sigma * v it equals the velocity MSE weighted
    by sigma^2 (1, .81, .5625, .25 on the four training states).

    Args:
        x0_student: [B, ...] predictions of the student (text-only context), with grad.
        x0_teacher: [B, ...] predictions of the teacher (multimodal context), no grad.

    Returns:
        A scalar fp32 tensor.
    """
    return torch.mean((x0_student.float() - x0_teacher.float()) ** 2)


def compute_velocity_distillation_loss(v_student: torch.Tensor, v_teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between student and teacher velocities at one roll-out state (the paper's text).

    Args:
        v_student: [B, ...] student velocity, with grad.
        v_teacher: [B, ...] teacher velocity, no grad.

    Returns:
        A scalar fp32 tensor.
    """
    return torch.mean((v_student.float() - v_teacher.float()) ** 2)
