"""Distances between a real and a generated feature set: Fréchet (FID) and kernel (KID), via torchmetrics.

torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` run their feature network inside
``update``. medsyn extracts each set's features once (Inception pool3 or a domain encoder) and reuses them for
FID, KID, precision/recall and the feature-space privacy audit, so the metrics here are given an identity
"network" and fed the features themselves: the statistics and formulas stay torchmetrics'.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

FEATURE_CHUNK = 4096


def _identity_network(dim: int) -> nn.Module:
    network = nn.Identity()
    network.num_features = dim
    return network


def as_feature_pair(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, minimum: int = 2):
    """Two (N, D) float64 feature sets with the same D, at least ``minimum`` rows each, all finite."""
    a, b = (torch.as_tensor(x).to(torch.float64) for x in (a, b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (N, D) feature arrays with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < minimum or len(b) < minimum:
        raise ValueError(f"need at least {minimum} samples per set, got {len(a)} and {len(b)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("features contain NaN or Inf")
    return a, b


def frechet_distance(real: np.ndarray | torch.Tensor, generated: np.ndarray | torch.Tensor) -> float:
    """||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)): FID when the features are Inception pool3."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, generated = as_feature_pair(real, generated)
    metric = FrechetInceptionDistance(feature=_identity_network(real.shape[1])).to(real.device)
    for features, is_real in ((real, True), (generated, False)):
        for chunk in features.split(FEATURE_CHUNK):
            metric.update(chunk, real=is_real)
    return float(metric.compute())


def kernel_distance(
    real: np.ndarray | torch.Tensor,
    generated: np.ndarray | torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: the unbiased squared MMD with a cubic polynomial kernel, mean and std over random subsets.

    Unlike FID it is unbiased in the sample size, so small sets can be compared. ``subset_size`` is capped at
    the smaller set's size; subsets are drawn from ``seed``, so the same inputs give the same numbers.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    real, generated = as_feature_pair(real, generated)
    subset_size = min(subset_size, len(real), len(generated))
    with warnings.catch_warnings():  # "will save all extracted features": the features are already in memory
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=_identity_network(real.shape[1]), subsets=subsets, subset_size=subset_size
        )
    metric.update(real, real=True)
    metric.update(generated, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
