"""The low-data case study's parts: does synthetic data help a classifier when real scans are scarce?

For a fraction of the real training split, every arm trains the same classifier (same seed, same steps, same
batch draws) on different data, and all arms are scored on the same bootstrap resamples of one cleaned test set,
so a gain is paired: real only; real + classic augmentation (random affine and intensity, on the fly); real + the
case study's pixel-noise copies; real + synthetic images at 1x, 2x and 4x the real count; synthetic only.

The test split is first cleaned of near-copies of any training slice (the audit's own distance), so that a
classifier cannot score by recognising a patient it was trained on. Fractions are stratified by class and nested
(for one seed, the 5% set is inside the 10% set), so the curve over fractions is not reshuffled at every point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from medsyn.baselines import pixel_noise_baseline
from medsyn.data import random_affine
from medsyn.privacy import NEAR_COPY_DISTANCE
from medsyn.privacy.memorisation import nearest_training_distances
from medsyn.privacy.statistics import binary_auc

from .downstream import _prepare, train_classifier

MIN_PER_CLASS = 2


def clean_test_split(train: np.ndarray, test: np.ndarray, copy_distance: float = NEAR_COPY_DISTANCE
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the test images to keep (no training image within ``copy_distance``, a pixel's shift allowed)
    and of those removed as near-copies of training images."""
    distances = nearest_training_distances(test, train, max_shift=1)[0]
    return np.flatnonzero(distances > copy_distance), np.flatnonzero(distances <= copy_distance)


def stratified_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``fraction`` of each class (at least ``MIN_PER_CLASS``), drawn by ``seed``.

    Each class is shuffled once per seed and its first ``round(fraction * n)`` indices are taken, so for one seed a
    smaller fraction is a subset of a larger one.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        order = np.random.default_rng([seed, int(label)]).permutation(members)
        count = min(len(members), max(MIN_PER_CLASS, round(fraction * len(members))))
        chosen.append(order[:count])
    return np.sort(np.concatenate(chosen))


def classic_augmentation(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine (rotation up to 10 degrees, shift up to 3 pixels, zoom up to 10%, always applied) and random
    intensity (contrast x0.8-1.2, brightness +-0.1 on the [-1, 1] scale) per image: the classic augmentation a
    synthetic-data gain has to beat."""
    moved = random_affine(images, generator, prob=1.0, max_degrees=10.0, max_shift_pixels=3.0, max_scale=0.1)
    batch = len(images)
    contrast = 0.8 + 0.4 * torch.rand(batch, 1, 1, 1, generator=generator)
    brightness = 0.2 * torch.rand(batch, 1, 1, 1, generator=generator) - 0.1
    return ((moved + 1) * contrast - 1 + brightness).clamp(-1, 1)


@dataclass
class Arm:
    """One way of training the classifier: its images and labels, and an optional on-the-fly augmentation."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None


def study_arms(real: np.ndarray, real_labels: np.ndarray, synthetic: np.ndarray, synthetic_labels: np.ndarray,
               multiples: tuple[int, ...] = (1, 2, 4), seed: int = 0) -> list[Arm]:
    """The arms for one fraction. The k x arm adds, per class, the first k x (that class's real count) synthetic
    images of the class, so it keeps the real set's class proportions; "synthetic only" uses the largest."""
    noisy = pixel_noise_baseline(real, sigma=0.3, seed=seed)
    arms = [Arm("real", real, real_labels),
            Arm("real + classic augmentation", real, real_labels, classic_augmentation),
            Arm("real + pixel noise", np.concatenate([real, noisy]), np.concatenate([real_labels, real_labels]))]
    for multiple in multiples:
        chosen = []
        for label in np.unique(real_labels):
            needed = multiple * int((real_labels == label).sum())
            available = np.flatnonzero(synthetic_labels == label)
            if len(available) < needed:
                raise ValueError(f"{len(available)} synthetic images of class {label}: {needed} are needed for "
                                 f"{multiple}x its real count")
            chosen.append(available[:needed])
        index = np.sort(np.concatenate(chosen))
        arms.append(Arm(f"real + synthetic {multiple}x", np.concatenate([real, synthetic[index]]),
                        np.concatenate([real_labels, synthetic_labels[index]])))
    arms.append(Arm("synthetic only", synthetic[index], synthetic_labels[index]))
    return arms


def synthetic_counts(real_labels: np.ndarray, num_classes: int, multiple: int) -> list[int]:
    """Synthetic images to make per class: ``multiple`` x each class's real count."""
    return [multiple * int((real_labels == c).sum()) for c in range(num_classes)]


def _as_nchw(images: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    return (tensor[:, None] if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)).contiguous()


def train_arm(arm: Arm, num_classes: int, steps: int, batch_size: int, learning_rate: float, seed: int):
    """The study's classifier (medsyn.evaluation.downstream's small ResNet) trained on one arm."""
    images = _prepare(_as_nchw(arm.images), None)
    return train_classifier(images, arm.labels, num_classes, steps, batch_size, learning_rate, seed,
                            progress=False, description=arm.name, augment=arm.augment)


@torch.no_grad()
def class_probabilities(model, test: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Class probabilities (N, classes) on the test images, two classes included."""
    images = _prepare(_as_nchw(test), None)
    return torch.cat([model(pixel_values=images[i : i + batch_size]).logits.softmax(-1)
                      for i in range(0, len(images), batch_size)])


@dataclass
class ArmMetrics:
    auc: float
    accuracy: float
    recall: list[float]


def arm_metrics(probabilities: np.ndarray, labels: np.ndarray, negative_class: int) -> ArmMetrics:
    """Tumour-vs-none ROC AUC (score: 1 - P(negative class)), 4-class accuracy and per-class recall."""
    predicted = probabilities.argmax(1)
    classes = probabilities.shape[1]
    return ArmMetrics(
        auc=binary_auc(1 - probabilities[:, negative_class], labels != negative_class),
        accuracy=float((predicted == labels).mean()),
        recall=[float((predicted[labels == c] == c).mean()) if (labels == c).any() else float("nan")
                for c in range(classes)],
    )


def paired_bootstrap(probabilities: dict[str, np.ndarray], labels: np.ndarray, negative_class: int,
                     resamples: int, seed: int) -> dict[str, np.ndarray]:
    """Per arm, (resamples, 2) of [tumour AUC, accuracy] on the same resamples of the test set for every arm."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {name: [] for name in probabilities}
    positive = labels != negative_class
    while len(rows[next(iter(rows))]) < resamples:
        index = rng.integers(0, len(labels), len(labels))
        if positive[index].all() or not positive[index].any():
            continue
        for name, probs in probabilities.items():
            metrics = arm_metrics(probs[index], labels[index], negative_class)
            rows[name].append([metrics.auc, metrics.accuracy])
    return {name: np.array(values) for name, values in rows.items()}


def paired_gain(point: float, boot: dict[str, np.ndarray], arm: str, reference: str, column: int) -> dict:
    """The gain of ``arm`` over ``reference`` on the whole test set (``point``) with the 95% percentile interval
    of the paired bootstrap differences (column 0: AUC, 1: accuracy)."""
    low, high = np.percentile(boot[arm][:, column] - boot[reference][:, column], [2.5, 97.5])
    return {"gain": point, "ci": [float(low), float(high)], "excludes_zero": bool(low > 0 or high < 0)}


def gain_over_seeds(gains: list[float]) -> dict:
    """Mean of per-seed gains with its 95% Student-t interval over seeds (None for a single seed).

    Each seed draws its own real fraction and trains its own generator and classifiers, so the spread of gains
    over seeds is the uncertainty a new user's run faces; the per-seed bootstrap sees only the test set's.
    """
    from scipy import stats

    values = np.asarray(gains, dtype=float)
    if values.ndim != 1 or len(values) == 0 or not np.isfinite(values).all():
        raise ValueError(f"gains must be a non-empty list of finite numbers, got {gains!r}")
    mean = float(values.mean())
    if len(values) < 2:
        return {"gain": mean, "ci": None, "seeds": 1, "excludes_zero": False}
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    low, high = mean - half, mean + half
    return {"gain": mean, "ci": [low, high], "seeds": len(values), "excludes_zero": bool(low > 0 or high < 0)}
