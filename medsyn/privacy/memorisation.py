"""Memorisation audit: is any generated image closer to a training image than unseen patients are?

Every generated image is matched to its nearest training images (exact search, ``nearest_neighbours``). The
threshold comes from the data: real held-out images are not in the training set, so their distances to it
show how close two different patients' slices get; a generated image closer than a low percentile of those is
flagged as a likely copy. A fixed threshold can be given instead.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .nearest_neighbours import nearest_neighbours


@dataclass
class MemorisationAudit:
    """The audit's verdict; ``to_json`` drops the per-image arrays."""

    passed: bool
    """No generated image is closer to a training image than the threshold."""
    threshold: float
    threshold_source: str
    min_distance: float
    flagged_indices: list[int]
    """Generated images closer than the threshold, closest first."""
    num_generated: int
    num_train: int
    seconds: float
    histogram_counts: list[int]
    histogram_edges: list[float]
    distances: np.ndarray = field(repr=False)
    """(num_generated, k) RMS pixel distances to the nearest training images, ascending."""
    neighbours: np.ndarray = field(repr=False)
    """(num_generated, k) indices of those training images."""

    def to_json(self) -> str:
        # Not asdict(): it would deep-copy the per-image arrays only to drop them.
        summary = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("distances", "neighbours")}
        return json.dumps(summary, indent=2)


def calibrate_threshold(
    held_out: np.ndarray | torch.Tensor,
    train: np.ndarray | torch.Tensor,
    percentile: float = 1.0,
    **search,
) -> float:
    """The ``percentile``-th percentile of held-out real images' nearest-training-image distances.

    Held-out images are real patients the model never saw, so a generated image closer to the training set
    than (almost) all of them is closer than chance resemblance explains.
    """
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    distances, _ = nearest_neighbours(held_out, train, k=1, **search)
    return float(np.percentile(distances[:, 0], percentile))


def memorisation_audit(
    generated: np.ndarray | torch.Tensor,
    train: np.ndarray | torch.Tensor,
    held_out: np.ndarray | torch.Tensor | None = None,
    threshold: float | None = None,
    percentile: float = 1.0,
    k: int = 3,
    bins: int = 50,
    **search,
) -> MemorisationAudit:
    """Match every generated image to its k nearest training images and flag those below the threshold.

    Args:
        generated, train, held_out: image stacks of one size (uint8 or [0, 1] floats).
        threshold: a fixed RMS pixel distance; otherwise calibrated on ``held_out`` at ``percentile``.
        k: training neighbours kept per generated image (for the side-by-side PNGs).
        search: passed to ``nearest_neighbours`` (``block_size``, ``device``, ``progress``).
    """
    if threshold is None and held_out is None:
        raise ValueError("give held-out real images to calibrate the threshold, or a fixed threshold")
    if threshold is not None and threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    started = time.perf_counter()
    if threshold is None:
        threshold = calibrate_threshold(held_out, train, percentile, **search)
        source = f"percentile {percentile:g} of {len(held_out)} held-out images' nearest-training distances"
    else:
        source = "fixed"
    distances, neighbours = nearest_neighbours(generated, train, k=min(k, len(train)), **search)
    nearest = distances[:, 0]
    flagged = np.flatnonzero(nearest < threshold)
    flagged = flagged[np.argsort(nearest[flagged], kind="stable")]
    counts, edges = np.histogram(nearest, bins=bins)
    return MemorisationAudit(
        passed=len(flagged) == 0,
        threshold=float(threshold),
        threshold_source=source,
        min_distance=float(nearest.min()),
        flagged_indices=flagged.tolist(),
        num_generated=len(nearest),
        num_train=len(train),
        seconds=round(time.perf_counter() - started, 2),
        histogram_counts=counts.tolist(),
        histogram_edges=edges.tolist(),
        distances=distances,
        neighbours=neighbours,
    )


def save_flagged_pairs(
    audit: MemorisationAudit,
    generated: np.ndarray,
    train: np.ndarray,
    output_dir: str | Path,
    max_images: int = 50,
) -> list[Path]:
    """One PNG per flagged image: the generated image, then its nearest training images, left to right."""
    from PIL import Image

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in audit.flagged_indices[:max_images]:
        row = [generated[index]] + [train[j] for j in audit.neighbours[index]]
        row = [np.asarray(image) if np.asarray(image).dtype == np.uint8 else
               np.round(np.clip(np.asarray(image), 0, 1) * 255).astype(np.uint8) for image in row]
        path = output_dir / f"flagged_{index:06d}_train_{audit.neighbours[index][0]:06d}.png"
        Image.fromarray(np.concatenate(row, axis=1)).save(path)
        paths.append(path)
    return paths
