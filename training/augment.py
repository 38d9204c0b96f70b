"""Batched augmentation in plain torch, for chest films (no horizontal flips: anatomy is not
symmetric). Small rotations, zooms and shifts as from patient positioning, plus a mild gamma
jitter for differences in film processing that equalisation does not fully remove."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment_batch(images: torch.Tensor, generator: torch.Generator,
                  max_rotation_degrees: float = 10.0, max_zoom: float = 0.10,
                  max_shift: float = 0.06, max_log_gamma: float = 0.25) -> torch.Tensor:
    """images: [N, 1, H, W] in [0, 1] -> augmented copy, same shape and range."""
    count = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(count, generator=generator) * (high - low) + low

    angle = uniform(-max_rotation_degrees, max_rotation_degrees) * math.pi / 180
    scale = 1.0 / uniform(1 - max_zoom, 1 + max_zoom)
    shift_x, shift_y = uniform(-max_shift, max_shift) * 2, uniform(-max_shift, max_shift) * 2
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1),
                         torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                           align_corners=False)
    gamma = torch.exp(uniform(-max_log_gamma, max_log_gamma)).view(count, 1, 1, 1)
    return warped.clamp(1e-6, 1.0).pow(gamma)
