"""Image transforms: deterministic preprocessing to [-1, 1], and the training augmentation as a batched op.

The augmentation runs on the batch inside the training loop, with a generator the loop seeds per step, rather
than in the data loader with the global RNG: a resumed run then draws exactly the augmentations an
uninterrupted one would, whatever the loader prefetched.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2


def image_transform(resolution: int, center_crop: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image ("L" or "RGB") to a float tensor (C, resolution, resolution) in [-1, 1], channels kept.

    Args:
        resolution: output height and width.
        center_crop: resize the short side, then crop the centre square; otherwise crop a random square (diffusers'
            scripts without ``--center_crop``). A square image is only resized either way.
    """
    steps: list = [v2.PILToTensor(), v2.Resize(resolution, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
                   v2.CenterCrop(resolution) if center_crop else v2.RandomCrop(resolution)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5], [0.5])]
    return v2.Compose(steps)


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    prob: float = 0.5,
    max_degrees: float = 5.0,
    max_shift_pixels: float = 1.0,
    max_scale: float = 0.05,
) -> torch.Tensor:
    """Small random rotation, shift and zoom per image, as MONAI's DDPM tutorial (RandAffine, prob 0.5).

    Small enough not to change the anatomy; no flips, which would swap the patient's left and right.

    Args:
        images: (B, C, H, W) in [-1, 1]; the background (-1) fills in at the borders.
        generator: the source of the random parameters (on the images' device).
    """
    batch, _, height, width = images.shape
    draw = lambda: torch.rand(batch, generator=generator, device=images.device) * 2 - 1  # noqa: E731
    angle = draw() * math.radians(max_degrees)
    scale = 1 + draw() * max_scale
    shift_x, shift_y = draw() * 2 * max_shift_pixels / width, draw() * 2 * max_shift_pixels / height
    apply = torch.rand(batch, generator=generator, device=images.device) < prob
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], device=images.device).expand_as(theta)
    theta = torch.where(apply.view(-1, 1, 1), theta, identity).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    return torch.where(apply.view(-1, 1, 1, 1), moved, images)


def image_channels(dataset) -> int:
    """Channel count of a medsyn dataset, read from its first image (the loader guarantees one count)."""
    return 1 if dataset[0]["image"].mode == "L" else 3
