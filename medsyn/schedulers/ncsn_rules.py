"""NCSNv2's rules for choosing the noise schedule from the data (Song & Ermon 2020, "Improved Techniques for
Training Score-Based Generative Models").

- Technique 1: sigma_1 = the largest Euclidean distance between two training images, so the largest noise
  level can carry Langevin dynamics from any image to any other.
- Technique 2: a geometric schedule whose ratio gamma satisfies
  Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) ~= 0.5, so neighbouring levels' noise
  shells overlap; L follows from sigma_1, sigma_L and gamma.
- Technique 4: the step size alpha that makes the variance after T Langevin steps at each level match sigma_i^2
  (their Proposition 3), for the T the compute budget allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def sigma_max_from_data(images: torch.Tensor | np.ndarray, max_images: int = 5000, block_size: int = 512) -> float:
    """Largest pairwise Euclidean distance between images (technique 1).

    Args:
        images: (N, ...) images on the scale the model is trained on (medsyn uses [-1, 1]).
        max_images: the first ``max_images`` are used; the distance grows slowly with N, and O(N^2) work
            beyond a few thousand images buys little.
        block_size: rows per block of the distance matrix, bounding memory.
    """
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 images as an (N, ...) array, got shape {tuple(x.shape)}")
    x = x[:max_images].reshape(min(len(x), max_images), -1).to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or Inf")
    best = 0.0
    for start in range(0, len(x), block_size):
        block = x[start : start + block_size]
        best = max(best, torch.cdist(block, x).max().item())
    return best


def geometric_ratio(dim: int) -> float:
    """The ratio gamma = sigma_{i-1} / sigma_i of technique 2 for data of dimension ``dim``, by bisection."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    root = math.sqrt(2.0 * dim)

    def overlap(gamma: float) -> float:
        centre = root * (gamma - 1.0)
        return _normal_cdf(centre + 3.0 * gamma) - _normal_cdf(centre - 3.0 * gamma)

    lo, hi = 1.0, 2.0
    while overlap(hi) > 0.5:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if overlap(mid) > 0.5 else (lo, mid)
    return 0.5 * (lo + hi)


def num_noise_levels(sigma_max: float, sigma_min: float, dim: int) -> int:
    """Number of geometric levels L from sigma_max to sigma_min with technique 2's ratio."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    return int(math.ceil(math.log(sigma_max / sigma_min) / math.log(geometric_ratio(dim)))) + 1


def langevin_variance_ratio(step_size: float, gamma: float, sigma_min: float, n_steps_each: int) -> float:
    """s_T^2 / sigma_i^2 after T Langevin steps at one level (NCSNv2 Proposition 3)."""
    decay = 1.0 - step_size / sigma_min**2
    stationary = 2.0 * step_size / (sigma_min**2 - sigma_min**2 * decay**2)
    return decay ** (2 * n_steps_each) * (gamma**2 - stationary) + stationary


def langevin_step_size(sigma_max: float, sigma_min: float, num_levels: int, n_steps_each: int) -> float:
    """Step size alpha that makes langevin_variance_ratio closest to 1 (technique 4)."""
    gamma = (sigma_max / sigma_min) ** (1.0 / (num_levels - 1))
    candidates = np.exp(np.linspace(math.log(sigma_min**2 * 1e-9), math.log(sigma_min**2 * 0.999), 20001))
    errors = [abs(langevin_variance_ratio(float(e), gamma, sigma_min, n_steps_each) - 1.0) for e in candidates]
    return float(candidates[int(np.argmin(errors))])


@dataclass
class NoiseSchedule:
    """A noise schedule chosen by the NCSNv2 rules, ready for ``AnnealedLangevinScheduler(**asdict(...))``."""

    sigma_max: float
    sigma_min: float
    num_train_timesteps: int
    step_size: float
    n_steps_each: int


def noise_schedule_from_data(
    images: torch.Tensor | np.ndarray, sigma_min: float = 0.01, n_steps_each: int = 5, max_levels: int | None = None
) -> NoiseSchedule:
    """Apply techniques 1, 2 and 4 to a set of training images.

    Args:
        images: (N, C, H, W) or (N, H, W) training images on the model's scale.
        sigma_min: the smallest level; 0.01 on a [-1, 1] scale is below 8-bit quantisation.
        n_steps_each: T, Langevin steps per level: the compute budget of technique 4.
        max_levels: cap on L for a limited budget (the ratio then grows beyond technique 2's).
    """
    images = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    sigma_max = sigma_max_from_data(images)
    dim = int(np.prod(images.shape[1:]))
    levels = num_noise_levels(sigma_max, sigma_min, dim)
    if max_levels is not None:
        levels = min(levels, max_levels)
    return NoiseSchedule(
        sigma_max=sigma_max,
        sigma_min=sigma_min,
        num_train_timesteps=levels,
        step_size=langevin_step_size(sigma_max, sigma_min, levels, n_steps_each),
        n_steps_each=n_steps_each,
    )
