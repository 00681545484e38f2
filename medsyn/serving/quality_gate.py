"""The QA gate every generated image passes before the service releases it.

A service that hands out images cannot wait for a batch audit: each image is judged on its own, at once, in the
audit's space (``medsyn.privacy.structure``: low-passed, normalised, noise-debiased, training images moved by up to
a pixel and mirrored), so a copy with noise, a slight blur, a brightness change, a move or a mirror is caught;
images under ``MIN_STRUCTURE_SIDE`` pixels a side, too small for structure, by RMS pixel distance:

- not finite (NaN or Inf from the network) or blank (no grey-level spread): withheld;
- a copy of a training image (relative structural distance within ``STRUCTURE_COPY_RATIO``; pixels: RMS within
  ``NEAR_COPY_DISTANCE``), or closer than the calibrated threshold when held-out images were given (the
  ``percentile``-th held-out patient's distance): withheld, naming the image;
- mean or spread outside the range the training images span (widened by a quarter of its width on each side,
  so that only images unlike any training image, such as saturated or washed-out ones, are caught): withheld.

The training images are the index, loaded once at start-up from any set ``medsyn evaluate`` reads, or from the
gate file ``QualityGate.save`` writes (the images, the space and the calibrated threshold), and prepared once
(``StructureIndex``), so each check costs a search, not a rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsyn.generation import to_uint8
from medsyn.privacy import calibrate_threshold
from medsyn.privacy.image_arrays import as_image_stack
from medsyn.privacy.memorisation import (
    MIN_STRUCTURE_SIDE,
    AuditSpace,
    default_copy_distance,
    nearest_training_distances,
)
from medsyn.privacy.structure import StructureIndex

RANGE_MARGIN = 0.25
"""Statistic ranges are widened by this share of their width on each side."""
BLANK_SPREAD = 1 / 255
"""An image whose grey levels spread less than one level (standard deviation on [0, 1]) shows nothing."""


@dataclass(frozen=True)
class QAVerdict:
    released: bool
    reason: str | None = None
    nearest_training_distance: float | None = None
    nearest_training_index: int | None = None


def _statistics(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-image mean and standard deviation on [0, 1] of (N, H, W, C) uint8 images."""
    values = images.reshape(len(images), -1).double() / 255
    return values.mean(1).numpy(), values.std(1).numpy()


def sanity_reason(finite: bool, spread: float) -> str | None:
    """Why an image fails the checks that need no training index (not finite, blank), or None."""
    if not finite:
        return "not finite: the network produced NaN or Inf"
    if spread < BLANK_SPREAD:
        return f"blank: grey levels spread {spread:.4f} < {BLANK_SPREAD:.4f}"
    return None


def _finite_and_spread(images: np.ndarray) -> tuple[np.ndarray, torch.Tensor, np.ndarray, np.ndarray]:
    """Per image of float (B, H, W, C): finite or not, the uint8 pixels, and their mean and spread on [0, 1]."""
    finite = np.isfinite(images).reshape(len(images), -1).all(1)
    pixels = torch.from_numpy(to_uint8(images))
    return finite, pixels, *_statistics(pixels)


def sanity_verdicts(images: np.ndarray) -> list[QAVerdict]:
    """The verdicts of the checks that need no training index, for a model served without one."""
    finite, _, _, spreads = _finite_and_spread(images)
    reasons = [sanity_reason(bool(f), float(s)) for f, s in zip(finite, spreads, strict=True)]
    return [QAVerdict(reason is None, reason) for reason in reasons]


def is_gate_file(spec: str | Path) -> bool:
    """Whether ``spec`` is a file ``QualityGate.save`` wrote (an NPZ with a ``qa_threshold``)."""
    path = Path(spec)
    if path.suffix != ".npz" or not path.is_file():
        return False
    with np.load(path, allow_pickle=False) as archive:
        return "qa_threshold" in archive.files


def _widened(values: np.ndarray) -> tuple[float, float]:
    low, high = float(values.min()), float(values.max())
    margin = RANGE_MARGIN * (high - low)
    return low - margin, high + margin


def gate_space(image_shape: tuple[int, ...], space: AuditSpace | str | None = None) -> AuditSpace:
    """The gate's space: ``space`` if given, else structure for images of at least ``MIN_STRUCTURE_SIDE`` pixels a
    side and pixels below (structure refuses smaller images)."""
    if space is not None:
        return AuditSpace(space)
    return AuditSpace.STRUCTURE if min(image_shape[:2]) >= MIN_STRUCTURE_SIDE else AuditSpace.PIXELS


class QualityGate:
    """Per-image release decisions against one model's training images (uint8, (N, H, W, C))."""

    def __init__(self, train: np.ndarray | torch.Tensor, threshold: float | None = None,
                 copy_distance: float | None = None, max_shift: int = 1, space: AuditSpace | str | None = None):
        self.train = as_image_stack(train, "train index")
        if self.train.dtype != torch.uint8:
            self.train = torch.from_numpy(to_uint8(self.train.numpy()))
        self.space = gate_space(self.image_shape, space)
        if self.space is AuditSpace.FEATURES:
            raise ValueError("space='features': the QA gate judges images; use 'structure' or 'pixels'")
        self.threshold, self.max_shift = threshold, max_shift
        self.copy_distance = default_copy_distance(self.space, copy_distance)
        self.mean_range, self.spread_range = (_widened(values) for values in _statistics(self.train))
        self.index = StructureIndex(self.train, max_shift) if self.space is AuditSpace.STRUCTURE else self.train

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images this gate can judge."""
        return tuple(self.train.shape[1:])

    @classmethod
    def from_image_sets(cls, train_spec: str, held_out_spec: str | None = None, percentile: float = 1.0,
                        space: AuditSpace | str | None = None) -> QualityGate:
        """A gate from a training set (and held-out real images to calibrate a threshold), or from a gate file."""
        from medsyn.evaluation import load_image_set

        if is_gate_file(train_spec):
            if held_out_spec is not None:
                raise ValueError(f"{train_spec} is a saved QA index with its threshold already calibrated; drop the "
                                 "held-out set")
            with np.load(train_spec, allow_pickle=False) as archive:
                threshold = float(archive["qa_threshold"])
                # A gate file from before the structural gate was calibrated in pixels.
                saved = str(archive["qa_space"]) if "qa_space" in archive.files else AuditSpace.PIXELS
                if space is not None and AuditSpace(space) != AuditSpace(saved):
                    raise ValueError(f"{train_spec} was calibrated in space {saved!r}, not {space!r}")
                return cls(archive["images"], threshold=None if np.isnan(threshold) else threshold, space=saved)
        train = load_image_set(train_spec, "train-index").images.permute(0, 2, 3, 1).contiguous()
        gate = cls(train, space=space)
        if held_out_spec is not None:
            held_out = load_image_set(held_out_spec, "held-out-index").images.permute(0, 2, 3, 1).contiguous()
            gate.threshold = calibrate_threshold(held_out, gate.index, percentile=percentile, space=gate.space)
        return gate

    def save(self, path: str | Path) -> None:
        """The gate as one NPZ (``images`` in the layout ``medsyn evaluate`` reads, the space, the threshold)."""
        from medsyn.output_files import write_npz_atomically

        images = self.train.numpy()
        write_npz_atomically(path, images=images[..., 0] if images.shape[-1] == 1 else images,
                             qa_threshold=np.float64(np.nan if self.threshold is None else self.threshold),
                             qa_space=np.str_(self.space.value))

    def _index_reason(self, distance: float, neighbour: int, mean: float, spread: float) -> str | None:
        """Why a finite, non-blank image fails against the index (copy, threshold, statistics), or None."""
        if distance <= self.copy_distance:
            measure = ("relative structural distance (moves, mirror, intensity, blur and noise allowed)"
                       if self.space is AuditSpace.STRUCTURE else "RMS distance")
            return f"near-copy of training image {neighbour}: {measure} {distance:.4f} <= {self.copy_distance:g}"
        if self.threshold is not None and distance < self.threshold:
            return (f"closer to training image {neighbour} ({distance:.4f}) than the calibrated threshold "
                    f"{self.threshold:.4f}")
        if not self.mean_range[0] <= mean <= self.mean_range[1]:
            return f"mean intensity {mean:.3f} outside the training range {self.mean_range[0]:.3f}-" \
                   f"{self.mean_range[1]:.3f}"
        if not self.spread_range[0] <= spread <= self.spread_range[1]:
            return f"contrast (std) {spread:.3f} outside the training range {self.spread_range[0]:.3f}-" \
                   f"{self.spread_range[1]:.3f}"
        return None

    def check(self, images: np.ndarray) -> list[QAVerdict]:
        """Verdicts for float images (B, H, W, C) in [0, 1], as a pipeline returns them."""
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"the QA index holds {self.image_shape} images, the model made {images.shape[1:]}")
        finite, pixels, means, spreads = _finite_and_spread(images)
        distances, neighbours, _, _ = nearest_training_distances(pixels, self.index, self.max_shift, space=self.space)
        verdicts = []
        for i in range(len(images)):
            distance, neighbour = float(distances[i]), int(neighbours[i])
            reason = sanity_reason(bool(finite[i]), float(spreads[i]))
            if not finite[i]:
                distance, neighbour = None, None
            if reason is None:
                reason = self._index_reason(distance, neighbour, float(means[i]), float(spreads[i]))
            verdicts.append(QAVerdict(reason is None, reason, distance, neighbour))
        return verdicts
