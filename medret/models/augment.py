"""The MedMNIST training augmentation, pure torch: here (floor 3) so that training methods that
make their own views (self-supervised ones) can use it as well as the trainer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, generator: torch.Generator, *, shift: float = 0.1, rotate: float = 10.0) -> torch.Tensor:
    """Small random translation, rotation, scale and contrast. No flips: left and right organs differ."""
    n = len(x)
    u = torch.rand(n, 5, generator=generator) * 2 - 1
    angle = u[:, 0] * math.radians(rotate)
    scale = 1 + 0.1 * u[:, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, u[:, 2] * shift * 2], 1), torch.stack([sin, cos, u[:, 3] * shift * 2], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    gain = (1 + 0.15 * u[:, 4])[:, None, None, None]
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * gain + mean).clamp_(0, 1)
