"""Properties of the pure loss functions."""

from __future__ import annotations

import torch

from dopsd.losses import compute_velocity_distillation_loss, compute_x0_distillation_loss


def test_zero_for_identical_inputs() -> None:
    x = torch.randn(2, 16, 8, 8)
    assert compute_x0_distillation_loss(x, x.clone()) == 0
    assert compute_velocity_distillation_loss(x, x.clone()) == 0


def test_is_the_mean_squared_error_and_symmetric() -> None:
    a, b = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    expected = torch.nn.functional.mse_loss(a, b)
    torch.testing.assert_close(compute_x0_distillation_loss(a, b), expected)
    torch.testing.assert_close(compute_x0_distillation_loss(b, a), expected)


def test_x0_loss_is_sigma_squared_weighted_velocity_loss() -> None:
    """x0 = x - sigma * v, so the x0 MSE is sigma^2 times the velocity MSE (the released code's weighting)."""
    x, v_s, v_t = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    for sigma in (1.0, 0.9, 0.75, 0.5):
        x0_loss = compute_x0_distillation_loss(x - sigma * v_s, x - sigma * v_t)
        torch.testing.assert_close(x0_loss, sigma**2 * compute_velocity_distillation_loss(v_s, v_t))


def test_bf16_inputs_give_an_fp32_scalar_with_gradient() -> None:
    a = torch.randn(4, 4, dtype=torch.bfloat16, requires_grad=True)
    loss = compute_x0_distillation_loss(a, torch.zeros(4, 4, dtype=torch.bfloat16))
    assert loss.dtype == torch.float32 and loss.ndim == 0
    loss.backward()
    assert a.grad is not None
