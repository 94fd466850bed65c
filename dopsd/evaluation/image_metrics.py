"""Image figures: distances in latent and pixel space, and a sharpness index (blur is how ordinary fine-tuning
breaks few-step models: the index falls; broken, noisy samples make it rise)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def mse_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of each sample of two equally shaped batches [N, ...] -> [N]."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def laplacian_variance(pixels: torch.Tensor) -> torch.Tensor:
    """Sharpness of each image [N, 3, H, W] in [0, 1]: the variance of the Laplacian of its luma (the standard
    focus measure), on the interior so borders do not count. [N], larger = more high-frequency detail."""
    luma = (pixels.float() * _LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True)
    response = F.conv2d(luma, _LAPLACIAN.view(1, 1, 3, 3))
    return response.flatten(1).var(1)
