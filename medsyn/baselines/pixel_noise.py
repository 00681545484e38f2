"""The simplest synthetic-data baseline: real images plus Gaussian pixel noise, clipped to the valid range.

Any generator worth shipping must beat it on fidelity and utility, and it fails every privacy audit by
construction (each "synthetic" image is a patient's image), which makes it the audit's positive control.
"""

from __future__ import annotations

import numpy as np


def pixel_noise_baseline(images: np.ndarray, sigma: float = 0.3, seed: int = 0) -> np.ndarray:
    """Return ``clip(images + N(0, sigma^2), 0, 1)`` on the [0, 1] intensity scale, in the input's dtype.

    Args:
        images: uint8 (0..255) or float images in [0, 1], any shape.
        sigma: noise standard deviation on the [0, 1] scale (the case study's 0.3).
        seed: seed of the noise.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    images = np.asarray(images)
    if images.dtype == np.uint8:
        scaled = images.astype(np.float64) / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        if not np.isfinite(images).all():
            raise ValueError("images contain NaN or Inf")
        if images.min() < 0 or images.max() > 1:
            raise ValueError(f"float images must lie in [0, 1], got [{images.min():.3g}, {images.max():.3g}]")
        scaled = images.astype(np.float64)
    else:
        raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    noisy = np.clip(scaled + np.random.default_rng(seed).normal(0.0, sigma, size=images.shape), 0.0, 1.0)
    return np.round(noisy * 255).astype(np.uint8) if images.dtype == np.uint8 else noisy.astype(images.dtype)
