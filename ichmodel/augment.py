"""Augmentation on the training device, on whole batches: uint8 in, float in [0, 1] out.

The loader ships the store's uint8 tensors as they are (4× less to copy than float32); the device
converts, and one `affine_grid` + `grid_sample` call per batch applies flips, small rotations,
scales and shifts to every slice at once. The geometry is drawn once per study window and shared
by all its slices, so a study stays a coherent volume for the sequence models. Areas shifted into
view are filled with 0, which is air in all three windows. Window jitter (off by default) is a
small change of each window's level and width (see `augment`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Magnitudes of the random transforms (all drawn uniformly in ±range unless said otherwise)."""

    hflip: float = 0.5  # probability of a left-right flip
    rotate_deg: float = 10.0
    scale: float = 0.1  # relative zoom, 1 ± scale
    shift: float = 0.06  # fraction of the image size
    window_jitter: bool = False
    contrast: float = 0.1  # k = 1 ± contrast (window jitter)
    brightness: float = 0.05  # d = ± brightness (window jitter)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (on whatever device `images` is)."""
    return images.float().div_(255.0)


def augment(
    images: torch.Tensor,
    group: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator,
    n_groups: int | None = None,
) -> torch.Tensor:
    """Augment a batch of slices (N, 3, H, W) uint8 or float on the device.

    `group` (N,) int64 on the device says which study window each slice belongs to (windows share
    their transform), `n_groups` how many windows there are (pass it: computing it from `group`
    waits for the GPU); `generator` lives on the same device and carries the augmentation's random
    state (saved in checkpoints so that a resumed run draws the same transforms).

    Window jitter perturbs each window channel by a small random contrast and brightness change,
    `v' = clip(v * k + d, 0, 1)`. For a channel `v = clip((HU - lo) / width, 0, 1)` this is exactly a
    change of level and width, `width' = width / k`, `lo' = lo - d * width'`, for the pixels inside
    the stored window (values clipped at conversion stay clipped), so it imitates scanners and
    reconstruction kernels that shift the HU scale slightly.
    """
    x = to_float(images) if images.dtype == torch.uint8 else images
    if n_groups is None:
        n_groups = int(group.max().item()) + 1 if group.numel() else 0
    if n_groups == 0 or x.shape[0] == 0:
        return x
    dev = x.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=dev, generator=generator) * 2 - 1

    flip = torch.rand(n_groups, device=dev, generator=generator) < config.hflip
    angle = uniform(n_groups) * math.radians(config.rotate_deg)
    zoom = 1 + uniform(n_groups) * config.scale
    shift = uniform(n_groups, 2) * config.shift * 2  # affine_grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    sx = torch.where(flip, -1.0, 1.0)
    theta = torch.stack(
        [
            torch.stack([cos * sx, -sin, shift[:, 0]], dim=1),
            torch.stack([sin * sx, cos, shift[:, 1]], dim=1),
        ],
        dim=1,
    )  # (G, 2, 3): output pixel -> input sampling position
    grid = F.affine_grid(theta[group], list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if config.window_jitter:
        k = 1 + uniform(n_groups, x.shape[1]) * config.contrast
        d = uniform(n_groups, x.shape[1]) * config.brightness
        x = (x * k[group, :, None, None] + d[group, :, None, None]).clamp_(0, 1)
    return x


__all__ = ["AugmentConfig", "augment", "to_float"]
