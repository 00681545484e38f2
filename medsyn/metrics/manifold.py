"""Precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020) on features.

Each set's manifold is the union of balls around its samples, each ball reaching the sample's k-th nearest
neighbour in its own set. Precision: the share of generated samples inside the real manifold (fidelity).
Recall: the share of real samples inside the generated manifold (variety). Density counts how many real balls
hold each generated sample (robust to real outliers); coverage is the share of real balls holding at least one
generated sample. All four come from one blocked pass over the generated-to-real distances.

Each pair keeps its authors' k: precision/recall k = 3 (Kynkäänniemi et al.), density/coverage k = 5 (Naeem et al.,
who chose it so that coverage of two samples of one distribution is 1 - 1/2^5 ~ 0.97).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .feature_distances import as_feature_pair

BLOCK = 2048


@dataclass
class ManifoldMetrics:
    precision: float
    recall: float
    density: float
    coverage: float
    k: int
    k_density: int

    def to_dict(self) -> dict:
        return asdict(self)


def _blocks(a: torch.Tensor, b: torch.Tensor):
    for start in range(0, len(a), BLOCK):
        yield start, torch.cdist(a[start : start + BLOCK], b)


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each sample to its k-th nearest other sample of the same set."""
    radii = torch.empty(len(features), dtype=features.dtype)
    for start, distances in _blocks(features, features):
        rows = torch.arange(len(distances))
        distances[rows, rows + start] = float("inf")
        radii[start : start + len(distances)] = distances.kthvalue(k, dim=1).values
    return radii


def manifold_metrics(
    real: np.ndarray | torch.Tensor, generated: np.ndarray | torch.Tensor, k: int = 3, k_density: int = 5
) -> ManifoldMetrics:
    """Precision and recall (k-NN balls, ``k``), density and coverage (``k_density``) of ``generated`` against
    ``real`` features (N, D)."""
    real, generated = as_feature_pair(real, generated, minimum=max(k, k_density) + 1)
    real_radii, generated_radii = knn_radii(real, k), knn_radii(generated, k)
    density_radii = real_radii if k_density == k else knn_radii(real, k_density)
    in_real_balls = torch.zeros(len(generated), dtype=torch.bool)  # generated sample inside some real ball
    in_density_balls = torch.zeros(len(generated), dtype=torch.long)  # how many real k_density balls hold it
    real_covered = torch.zeros(len(real), dtype=torch.bool)  # real k_density ball holds some generated sample
    real_recalled = torch.zeros(len(real), dtype=torch.bool)  # real sample inside some generated ball
    for start, distances in _blocks(generated, real):
        rows = slice(start, start + len(distances))
        in_real_balls[rows] = (distances <= real_radii[None]).any(1)
        inside_density = distances <= density_radii[None]
        in_density_balls[rows] = inside_density.sum(1)
        real_covered |= inside_density.any(0)
        real_recalled |= (distances <= generated_radii[rows, None]).any(0)
    return ManifoldMetrics(
        precision=float(in_real_balls.double().mean()),
        recall=float(real_recalled.double().mean()),
        density=float(in_density_balls.double().sum() / (k_density * len(generated))),
        coverage=float(real_covered.double().mean()),
        k=k,
        k_density=k_density,
    )


def realism_scores(real: np.ndarray | torch.Tensor, generated: np.ndarray | torch.Tensor, k: int = 3) -> np.ndarray:
    """Kynkäänniemi et al.'s realism score per generated sample: max over real r of radius(r) / d(g, r).

    Above 1 means inside the real manifold; the lowest scores pick out the least realistic images. Real
    samples with the largest half of the radii are left out, as in the paper, so outliers do not vouch for
    anything.
    """
    real, generated = as_feature_pair(real, generated, minimum=k + 1)
    radii = knn_radii(real, k)
    keep = radii <= radii.median()
    real, radii = real[keep], radii[keep]
    scores = torch.empty(len(generated), dtype=torch.float64)
    for start, distances in _blocks(generated, real):
        scores[start : start + len(distances)] = (radii[None] / distances.clamp(min=1e-12)).max(1).values
    return scores.numpy()
