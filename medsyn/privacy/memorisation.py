"""Memorisation audit: does any generated image copy a training image, and are generated images as a whole
closer to the training set than unseen patients are?

Every generated image is matched to its nearest training images (exact search) after both sets are brought to
one representation (``image_arrays``). By default images are compared by structure (``structure``: low-passed,
zero-mean, unit-norm, noise-debiased, training images moved by up to a pixel and mirrored) and judged by Carlini
et al.'s relative distance, so that noise, blur, brightness, contrast, small moves and mirroring neither hide a
copy nor fail a fresh-draw generator; ``space="pixels"`` keeps plain RMS pixel distance. The verdict has two parts:

1. Near-copies always fail: a generated image within ``copy_distance`` of a training image (a relative distance
   for structure, RMS on [0, 1] for pixels) is a copy, whatever any calibration says.
2. A statistical comparison with held-out real images, which the model never saw: their distances to the
   training set show how close different patients' images get by chance. The data-copying test (Mann-Whitney
   U, Meehan et al. 2020) and an exact test of the count below a calibrated threshold (the ``percentile``-th
   held-out distance) each run at ``alpha / 2``, so a generator drawing fresh images passes with probability
   at least ``1 - alpha``. A percentile threshold flags about that percentile of novel images by design: the
   flagged list is for reading, the tests decide.

Held-out images that are themselves near-copies of training images (leaks between splits) would drag the
calibration to 0; they are excluded with a warning that counts them.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch

from medsyn.validation import finite_number

from .image_arrays import as_image_stack, common_representation
from .nearest_neighbours import nearest_neighbours, shift_tolerant_nearest
from .statistics import TestResult, data_copying_test, exchangeability_test, flagged_count_test
from .structure import (
    RELATIVE_NEIGHBOURS,
    STRUCTURE_COPY_RATIO,
    StructureIndex,
    relative_distances,
    structural_nearest,
    with_matched_noise,
)

NEAR_COPY_DISTANCE = 0.01
"""RMS pixel distance on [0, 1] (2.6 grey levels) under which two images are the same image: a copy plus faint
noise or recompression. Different patients' slices are several times further apart."""
MIN_HELD_OUT = 20
MIN_STRUCTURE_SIDE = 16
"""Smaller images keep too few independent values after the structural low-pass for copies to stand out."""
EXCHANGEABILITY_ALPHA = 0.01
"""Below this two-sided p the held-out set is reported as not exchangeable with the training set (a strict level:
the check is for sets from another source or protocol, such as the public brain set's test split)."""


class AuditSpace(StrEnum):
    """What the audit compares: images by structure (relative structural distance, ``medsyn.privacy.structure``),
    images by RMS pixel distance on [0, 1], or an encoder's feature vectors."""

    STRUCTURE = "structure"
    PIXELS = "pixels"
    FEATURES = "features"


@dataclass
class MemorisationAudit:
    """The audit's verdict and the numbers behind it; ``to_json`` drops the per-image arrays."""

    passed: bool
    verdict: str
    """Why it passed or failed, in one sentence."""
    near_copy_indices: list[int]
    """Generated images within ``copy_distance`` of a training image, closest first: always a failure."""
    copy_distance: float
    flagged_indices: list[int]
    """Generated images closer than the threshold (or near-copies), closest first: the images to look at."""
    threshold: float
    threshold_source: str
    expected_flagged: float | None
    """Flagged images expected of a generator that draws fresh images (None for a fixed threshold)."""
    flagged_p_value: float | None
    data_copying_z: float | None
    """Meehan et al.'s Z_U: 0 for fresh draws, well below 0 when generated images sit closer than held-out ones."""
    data_copying_p_value: float | None
    alpha: float
    held_out_used: int | None
    held_out_duplicates_excluded: int
    held_out_excluded_indices: list[int]
    """Held-out images left out of the calibration as near-copies of training images (leaks between splits)."""
    min_distance: float
    num_generated: int
    num_train: int
    space: str
    seconds: float
    histogram_counts: list[int]
    histogram_edges: list[float]
    distances: np.ndarray = field(repr=False)
    """(num_generated, k) distances to the nearest training images in the audit's space, ascending (structure:
    structural distances, moves and mirrors allowed; pixels: plain RMS)."""
    neighbours: np.ndarray = field(repr=False)
    """(num_generated, k) indices of those training images."""
    exchangeability_z: float | None = None
    """Z_U of held-out vs training images' distances to a random half of the training set: near 0 when the held-out
    set is exchangeable with the training set, as the calibration assumes."""
    exchangeability_p_value: float | None = None
    held_out_exchangeable: bool | None = None
    """False: the verdict is "inconclusive" (unless near-copies fail it), the calibration's assumption being broken."""
    held_out_distances: np.ndarray | None = field(default=None, repr=False)
    """Nearest-training distances of the held-out images used for calibration."""
    nearest_distances: np.ndarray | None = field(default=None, repr=False)
    """(num_generated,) the distance decided on: structure, the relative distance; pixels, the RMS distance to the
    nearest training image, shifts allowed."""
    nearest_indices: np.ndarray | None = field(default=None, repr=False)
    max_shift: int = 0
    mirror: bool = False

    def to_json(self) -> str:
        # Not asdict(): it would deep-copy the per-image arrays only to drop them.
        arrays = ("distances", "neighbours", "held_out_distances", "nearest_distances", "nearest_indices")
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self) if f.name not in arrays}, indent=2)


def default_copy_distance(space: AuditSpace | str, copy_distance: float | None = None) -> float:
    """``copy_distance`` if given, else the space's: ``STRUCTURE_COPY_RATIO`` (a relative distance),
    ``NEAR_COPY_DISTANCE`` (RMS on [0, 1]), or 0 for feature vectors (identical vectors only)."""
    if copy_distance is not None:
        return copy_distance
    return {AuditSpace.STRUCTURE: STRUCTURE_COPY_RATIO, AuditSpace.PIXELS: NEAR_COPY_DISTANCE}.get(
        AuditSpace(space), 0.0)


def _calibration_rank(percentile: float, count: int) -> int:
    """The order statistic that serves as the ``percentile``-th percentile of ``count`` values (at least the 1st)."""
    return min(count, max(1, math.ceil(percentile / 100 * count)))


def check_structure_side(images: np.ndarray | torch.Tensor) -> None:
    """Refuse images too small to compare by structure, naming the way out."""
    side = min(as_image_stack(images[:1], "images").shape[1:3])
    if side < MIN_STRUCTURE_SIDE:
        raise ValueError(f"space='structure' needs images of at least {MIN_STRUCTURE_SIDE} px a side, got {side}: "
                         "the low-pass leaves too little of smaller images to tell copies apart; use space='pixels'")


def nearest_training_distances(
    images: np.ndarray | torch.Tensor,
    train: np.ndarray | torch.Tensor | StructureIndex,
    max_shift: int = 1,
    k: int = 1,
    space: AuditSpace | str = AuditSpace.PIXELS,
    mirror: bool = True,
    **search,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The distance the audit decides on, for each image. Structure: the relative structural distance (training
    images moved by up to ``max_shift`` pixels and, with ``mirror``, mirrored). Pixels: the RMS distance to the
    nearest training image, moved by up to ``max_shift`` pixels (0: plain distance). Feature vectors are compared
    as they are.

    Returns (distance (N,), training index (N,)) and the k nearest in the space's own distance (structure) or
    plain (pixels, features), as distances and indices (N, k). Generated and held-out images go through this same
    function, so they stay comparable. With structure, ``train`` may be a prepared ``StructureIndex`` (its own
    ``max_shift`` and ``mirror`` apply).
    """
    if AuditSpace(space) is AuditSpace.STRUCTURE and np.ndim(images) != 2:
        check_structure_side(images)
        wanted = min(max(k, RELATIVE_NEIGHBOURS), len(train))
        distances, neighbours = structural_nearest(images, train, max_shift, k=wanted, mirror=mirror, **search)
        return relative_distances(distances), neighbours[:, 0], distances[:, :k], neighbours[:, :k]
    distances, neighbours = nearest_neighbours(images, train, k=min(k, len(train)), **search)
    if max_shift and np.ndim(images) != 2:
        nearest, index = shift_tolerant_nearest(images, train, max_shift, k=1, unshifted=(distances, neighbours),
                                                **search)
        nearest, index = nearest[:, 0], index[:, 0]
    else:
        nearest, index = distances[:, 0], neighbours[:, 0]
    return nearest, index, distances, neighbours


def held_out_distances(
    held_out: np.ndarray | torch.Tensor,
    train: np.ndarray | torch.Tensor | StructureIndex,
    copy_distance: float | None = None,
    max_shift: int = 1,
    **search,
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out images' nearest-training distances, without the held-out images that are near-copies of training
    images (a warning counts them); and the indices of those excluded.

    Raises a ``ValueError`` when fewer than ``MIN_HELD_OUT`` remain: the held-out set overlaps the training set.
    """
    copy_distance = default_copy_distance(search.get("space", AuditSpace.PIXELS), copy_distance)
    distances = nearest_training_distances(held_out, train, max_shift, **search)[0]
    excluded = np.flatnonzero(distances <= copy_distance)
    duplicates = len(excluded)
    kept = distances[distances > copy_distance]
    if len(kept) < MIN_HELD_OUT:
        raise ValueError(
            f"held-out set: {duplicates} of {len(distances)} images are within {copy_distance:g} of a training image "
            f"(the held-out set overlaps the training set); {len(kept)} remain, at least {MIN_HELD_OUT} are needed")
    if duplicates:
        warnings.warn(f"held-out set: {duplicates} of {len(distances)} images are near-copies of training images "
                      f"(within {copy_distance:g}); excluded from the calibration", stacklevel=2)
    return kept, excluded


def held_out_exchangeability(
    held_out: np.ndarray | torch.Tensor,
    train: np.ndarray | torch.Tensor,
    copy_distance: float | None = None,
    max_shift: int = 1,
    seed: int = 0,
    **search,
) -> TestResult | None:
    """Is ``held_out`` exchangeable with ``train``, as the audit's calibration assumes? Both are compared with one
    random half of ``train``: the held-out images' nearest distances to it against the other half's, near-copies
    left out of both (repeats inside a training set would otherwise look like closeness), by a two-sided
    Mann-Whitney test (``exchangeability_test``). None when either side has fewer than ``MIN_HELD_OUT`` images.

    A generator that learnt the training distribution well draws images like the training half, not like a held-out
    set from another source; calibrated on the latter it would fail for being good. Hold out part of the training
    data before training instead."""
    copy_distance = default_copy_distance(search.get("space", AuditSpace.PIXELS), copy_distance)
    order = np.random.default_rng(seed).permutation(len(train))
    reference, others = order[: len(train) // 2], order[len(train) // 2 :]
    index = torch.as_tensor(reference) if torch.is_tensor(train) else reference
    rest = torch.as_tensor(others) if torch.is_tensor(train) else others
    kept = []
    for images in (held_out, train[rest]):
        distances = nearest_training_distances(images, train[index], max_shift, **search)[0]
        kept.append(distances[distances > copy_distance])
    if min(len(kept[0]), len(kept[1])) < MIN_HELD_OUT:
        return None  # too few to test (a training set under 2 x MIN_HELD_OUT images)
    return exchangeability_test(*kept)


def calibrate_threshold(
    held_out: np.ndarray | torch.Tensor,
    train: np.ndarray | torch.Tensor | StructureIndex,
    percentile: float = 1.0,
    copy_distance: float | None = None,
    max_shift: int = 1,
    **search,
) -> float:
    """The ``percentile``-th percentile (an order statistic) of held-out real images' nearest-training distances,
    held-out near-copies of training images excluded."""
    percentile = finite_number(percentile, "percentile", 0, maximum=100)
    distances, _ = held_out_distances(held_out, train, copy_distance, max_shift, **search)
    return float(np.sort(distances)[_calibration_rank(percentile, len(distances)) - 1])


def memorisation_audit(
    generated: np.ndarray | torch.Tensor,
    train: np.ndarray | torch.Tensor,
    held_out: np.ndarray | torch.Tensor | None = None,
    threshold: float | None = None,
    percentile: float = 1.0,
    alpha: float = 0.05,
    copy_distance: float | None = None,
    space: AuditSpace | str = AuditSpace.STRUCTURE,
    max_shift: int = 1,
    mirror: bool = True,
    k: int = 3,
    bins: int = 50,
    check_exchangeable: bool = True,
    **search,
) -> MemorisationAudit:
    """Audit every generated image against the training set and decide (see the module docstring).

    Args:
        generated, train, held_out: images in any layout and dtype ``as_image_stack`` accepts (each set may
            differ), or (N, D) feature vectors with ``space="features"``.
        space: ``structure`` (default: robust to noise, blur, intensity, moves and mirrors), ``pixels`` (plain
            RMS distance) or ``features``.
        threshold: a fixed distance; ``passed`` then also needs no generated image below it. Otherwise the
            threshold is calibrated on ``held_out`` at ``percentile``.
        alpha: the verdict's false-failure rate for a generator that draws fresh images.
        copy_distance: near-copy distance; default ``STRUCTURE_COPY_RATIO`` (a relative distance) for structure,
            ``NEAR_COPY_DISTANCE`` for pixels, 0 (identical vectors only) for features.
        max_shift: training images may move by up to this many pixels when compared (a copy moved by a pixel
            is still a copy); 0 for plain distances. Ignored for features.
        mirror: structure only: a training image's left-right mirror counts as the image (off for images whose
            sides differ, such as a fundus photograph's optic disc side when that is the finding).
        k: training neighbours kept per generated image (for the side-by-side PNGs).
        check_exchangeable: first test that ``held_out`` is exchangeable with ``train``
            (``held_out_exchangeability``); when it is not, the verdict is "inconclusive" (near-copies still fail).
        search: passed to ``nearest_neighbours`` (``block_size``, ``device``, ``progress``).
    """
    space = AuditSpace(space)
    if threshold is None and held_out is None:
        raise ValueError("give held-out real images to calibrate the threshold, or a fixed threshold")
    if threshold is not None:
        threshold = finite_number(threshold, "threshold", 0)
    percentile = finite_number(percentile, "percentile", 0, maximum=100)
    alpha = finite_number(alpha, "alpha", 0, exclusive=True, maximum=1)
    copy_distance = finite_number(default_copy_distance(space, copy_distance), "copy_distance", 0)
    if isinstance(max_shift, bool) or not isinstance(max_shift, (int, np.integer)) or max_shift < 0:
        raise ValueError(f"max_shift must be a whole number >= 0, got {max_shift!r}")
    if space is AuditSpace.FEATURES:
        max_shift = 0
    else:  # convert once, to one dtype: each set is searched against train, some twice
        stacks = [as_image_stack(x, name) for x, name in ((generated, "generated"), (train, "train"),
                                                          (held_out, "held_out")) if x is not None]
        generated, train, *rest = common_representation(*stacks)
        held_out = rest[0] if rest else None
    search = {"space": space, "mirror": bool(mirror) and space is AuditSpace.STRUCTURE, **search}
    started = time.perf_counter()
    # Generated and held-out images are searched against one index: structure prepares it once when it fits.
    structural = space is AuditSpace.STRUCTURE and np.ndim(generated) != 2
    if structural:
        check_structure_side(generated)
    index = StructureIndex(train, max_shift, search["mirror"], device=search.get("device")) if structural else train
    nearest, nearest_index, distances, neighbours = nearest_training_distances(
        generated, index, max_shift, k=min(k, len(train)), **search)
    near_copies = np.flatnonzero(nearest <= copy_distance)
    near_copies = near_copies[np.argsort(nearest[near_copies], kind="stable")]

    calibration, excluded, expected, count_p, copying = None, np.array([], dtype=int), None, None, None
    exchangeable = None
    if held_out is not None:
        calibrating = with_matched_noise(held_out, generated) if structural else held_out
        calibration, excluded = held_out_distances(calibrating, index, copy_distance, max_shift, **search)
        copying = data_copying_test(nearest, calibration)
        if check_exchangeable:
            exchangeable = held_out_exchangeability(held_out, train, copy_distance, max_shift, **search)
    if threshold is None:
        rank = _calibration_rank(percentile, len(calibration))
        threshold = float(np.sort(calibration)[rank - 1])
        source = (f"order statistic {rank} of {len(calibration)} held-out images' nearest-training distances "
                  f"(percentile {percentile:g})")
        count = flagged_count_test(int((nearest < threshold).sum()), len(nearest), rank, len(calibration))
        expected, count_p = count.statistic, count.p_value
        tests_alpha = alpha / 2
    else:
        source = "fixed"
        tests_alpha = alpha
    flagged = np.flatnonzero((nearest < threshold) | (nearest <= copy_distance))
    flagged = flagged[np.argsort(nearest[flagged], kind="stable")]

    if len(near_copies):
        measure = "relative structural distance" if space is AuditSpace.STRUCTURE else "distance"
        verdict = (f"failed: {len(near_copies)} generated images are copies of training images ({measure} <= "
                   f"{copy_distance:g})")
    elif exchangeable is not None and exchangeable.p_value < EXCHANGEABILITY_ALPHA:
        verdict = (f"inconclusive: the held-out images are not exchangeable with the training images (Z_U "
                   f"{exchangeable.statistic:.2f} against a random half of the training set, p = "
                   f"{exchangeable.p_value:.2g} < {EXCHANGEABILITY_ALPHA:g}); calibrate on images held out from the "
                   "training data before training")
    elif count_p is not None and count_p < tests_alpha:
        verdict = (f"failed: {len(flagged)} generated images below the threshold where {expected:.1f} are expected "
                   f"(p = {count_p:.2g} < {tests_alpha:g})")
    elif copying is not None and copying.p_value < tests_alpha:
        verdict = (f"failed: generated images are closer to the training set than held-out images are "
                   f"(data-copying Z_U = {copying.statistic:.2f}, p = {copying.p_value:.2g} < {tests_alpha:g})")
    elif source == "fixed" and len(flagged):
        verdict = f"failed: {len(flagged)} generated images are closer than the fixed threshold {threshold:g}"
    else:
        verdict = "passed: no near-copies" + (
            "" if copying is None else ", and generated images are no closer to the training set than held-out ones")
    counts, edges = np.histogram(nearest, bins=bins)
    return MemorisationAudit(
        passed=verdict.startswith("passed"),
        verdict=verdict,
        near_copy_indices=near_copies.tolist(),
        copy_distance=copy_distance,
        flagged_indices=flagged.tolist(),
        threshold=float(threshold),
        threshold_source=source,
        expected_flagged=expected,
        flagged_p_value=count_p,
        data_copying_z=None if copying is None else copying.statistic,
        data_copying_p_value=None if copying is None else copying.p_value,
        exchangeability_z=None if exchangeable is None else exchangeable.statistic,
        exchangeability_p_value=None if exchangeable is None else exchangeable.p_value,
        held_out_exchangeable=None if exchangeable is None else exchangeable.p_value >= EXCHANGEABILITY_ALPHA,
        alpha=alpha,
        held_out_used=None if calibration is None else len(calibration),
        held_out_duplicates_excluded=len(excluded),
        held_out_excluded_indices=excluded.tolist(),
        min_distance=float(nearest.min()),
        num_generated=len(nearest),
        num_train=len(train),
        space=space.value,
        seconds=round(time.perf_counter() - started, 2),
        histogram_counts=counts.tolist(),
        histogram_edges=edges.tolist(),
        distances=distances,
        neighbours=neighbours,
        held_out_distances=calibration,
        nearest_distances=nearest,
        nearest_indices=nearest_index,
        max_shift=max_shift,
        mirror=search["mirror"],
    )


def _one_image(images: np.ndarray | torch.Tensor, index: int, name: str) -> torch.Tensor:
    """Image ``index`` of a stack (or the one image given alone) as (H, W, C): only the images shown are
    converted, not whole sets."""
    stack = images[None] if np.ndim(images) == 2 else images
    return as_image_stack(stack[index : index + 1], name)[0]


def save_flagged_pairs(
    audit: MemorisationAudit,
    generated: np.ndarray | torch.Tensor,
    train: np.ndarray | torch.Tensor,
    output_dir: str | Path,
    max_images: int = 50,
) -> list[Path]:
    """One PNG per flagged image: the generated image, then its nearest training images, left to right."""
    from PIL import Image

    from medsyn.output_files import atomic_write

    shown = audit.flagged_indices[:max_images]
    if not shown:
        return []
    as_uint8 = lambda t: t if t.dtype == torch.uint8 else (t.double() * 255).round().to(torch.uint8)  # noqa: E731
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in shown:
        nearest = int(audit.nearest_indices[index])
        others = [int(j) for j in audit.neighbours[index] if j != nearest]
        shown_train = [nearest] + others[: audit.neighbours.shape[1] - 1]
        images = [_one_image(generated, index, "generated")] + [_one_image(train, j, "train") for j in shown_train]
        row = torch.cat([as_uint8(image) for image in images], dim=1).numpy()
        path = output_dir / f"flagged_{index:06d}_train_{nearest:06d}.png"
        with atomic_write(path) as temporary:
            Image.fromarray(row[..., 0] if row.shape[-1] == 1 else row).save(temporary, format="PNG")
        paths.append(path)
    return paths
