"""Membership inference against a released synthetic image set: the attacker holds the images, not the model.

medsyn's main release is a set of synthetic scans, so the question a privacy reviewer asks of it is whether those
images tell who was in the training set. Each candidate scan gets a statistic, higher for "more likely a member",
reported as ``medsyn.privacy.membership`` reports attacks on weights (AUC, TPR at 1% and 0.1% FPR, bootstrap CIs).

- ``nearest`` (Chen et al. 2020, GAN-Leaks' full black-box attack; Hilprecht et al. 2019's Monte-Carlo attack as
  its radius shrinks): minus the distance from the candidate to its nearest synthetic image. A generator that
  reproduces its training scans puts a synthetic image next to each member.
- ``domias`` (van Breugel et al. 2023, "Membership inference attacks against synthetic data through overfitting
  detection"): the synthetic set's density at the candidate over the real population's density there, the latter
  estimated from a reference set of real images that are neither members nor candidates. A member in a region
  where real scans are dense is near synthetic images for that reason alone; the ratio asks whether the synthetic
  set is denser there than the population, which is what overfitting leaves. Densities are k-nearest-neighbour
  estimates, p(x) proportional to 1 / (n d_k(x)^D) with D the data's dimension, so the log ratio is
  D log(d_k^reference(x) / d_k^synthetic(x)) plus a constant: the statistic is log(d_k^reference / d_k^synthetic),
  which ranks candidates the same way without guessing D.

Distances are the memorisation audit's (``space``): structural by default, so a released copy with noise, a
slight blur, a brightness change, a one-pixel move or a mirror counts as near as an exact one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

from .image_arrays import as_image_stack, common_representation
from .memorisation import AuditSpace, check_structure_side, default_copy_distance, nearest_training_distances
from .nearest_neighbours import nearest_neighbours
from .structure import StructureIndex


class ReleasedSetMethod(StrEnum):
    NEAREST = "nearest"
    DOMIAS = "domias"


@dataclass(frozen=True)
class ReleasedSetSettings:
    method: ReleasedSetMethod = ReleasedSetMethod.DOMIAS
    k: int = 1
    """Neighbour of the k-NN density estimates (DOMIAS). 1 by default: a generator that reproduces a member puts
    one image next to it, which moves the 1st neighbour's distance and not the 5th's (k = 5 scored AUC 0.51 on a
    set holding mirrored copies of half the members; k = 1 finds them). The nearest attack always uses the first."""
    space: AuditSpace = AuditSpace.STRUCTURE
    max_shift: int = 1
    """Structure: synthetic and reference images may move by up to this many pixels."""
    mirror: bool = True
    """Structure: a mirrored image counts as the image."""
    seed: int = 0
    """Seed of the report's bootstrap."""

    def __post_init__(self):
        object.__setattr__(self, "method", ReleasedSetMethod(self.method))
        object.__setattr__(self, "space", AuditSpace(self.space))
        if self.space is AuditSpace.FEATURES:
            raise ValueError("space must be 'structure' or 'pixels' for images")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a whole number >= 1, got {self.k!r}")


def _distances(queries: torch.Tensor, images: torch.Tensor, k: int, settings: ReleasedSetSettings,
               name: str) -> np.ndarray:
    """(N, k) distances from each query to its k nearest ``images`` in the settings' space."""
    if len(images) < k:
        raise ValueError(f"{name}: {len(images)} images, the attack needs at least k = {k}")
    if settings.space is AuditSpace.STRUCTURE:
        check_structure_side(images)
        return StructureIndex(images, settings.max_shift, settings.mirror, cache_bytes=0).nearest(queries, k)[0]
    return nearest_neighbours(queries, images, k=k)[0]


def _overlap(candidates: torch.Tensor, reference: torch.Tensor) -> int:
    """How many candidates appear, pixel for pixel, in the reference set."""
    flat = {bytes(image.numpy()) for image in reference.reshape(len(reference), -1)}
    return sum(bytes(image.numpy()) in flat for image in candidates.reshape(len(candidates), -1))


def _without_copies_of(reference: torch.Tensor, candidates: torch.Tensor, settings: ReleasedSetSettings
                       ) -> torch.Tensor:
    """The reference without images that copy a candidate (by the audit's copy rule, a warning counts them): a
    repeated scan in the reference makes its candidate look dense in the population, and so less like a member."""
    relative = nearest_training_distances(reference, candidates, max_shift=settings.max_shift, space=settings.space,
                                          mirror=settings.mirror)[0]
    copies = relative <= default_copy_distance(settings.space)
    if copies.any():
        warnings.warn(f"reference: {int(copies.sum())} of {len(reference)} images copy a candidate (repeated scans); "
                      "left out of the population density", stacklevel=3)
    return reference[torch.from_numpy(~copies)]


def released_set_statistics(
    synthetic: np.ndarray | torch.Tensor,
    members: np.ndarray | torch.Tensor,
    non_members: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor | None = None,
    settings: ReleasedSetSettings = ReleasedSetSettings(),
) -> tuple[np.ndarray, np.ndarray]:
    """The statistic of each member and non-member (module docstring), higher meaning "more likely a member".

    Images in any layout and dtype ``as_image_stack`` accepts. ``reference``: real images of the training
    population that are neither members nor candidates, needed by ``domias``; a candidate found in it is an
    error (its own image would be its nearest reference), and its copies of a candidate (repeated scans) are left
    out with a warning.
    """
    names = ("synthetic", "members", "non_members", "reference")
    given = [(x, name) for x, name in zip((synthetic, members, non_members, reference), names) if x is not None]
    stacks = dict(zip([name for _, name in given],
                      common_representation(*(as_image_stack(x, name) for x, name in given))))
    domias = settings.method is ReleasedSetMethod.DOMIAS
    candidates = torch.cat([stacks["members"], stacks["non_members"]])
    if domias:
        if reference is None:
            raise ValueError("method 'domias' needs a reference set: real images of the same population that are "
                             "neither members nor candidates")
        if shared := _overlap(candidates, stacks["reference"]):
            raise ValueError(f"reference: {shared} of the candidate images are in the reference set; it must hold "
                             "other real images")
        stacks["reference"] = _without_copies_of(stacks["reference"], candidates, settings)
    k = settings.k if domias else 1
    to_synthetic = _distances(candidates, stacks["synthetic"], k, settings, "synthetic")[:, k - 1]
    if domias:
        to_reference = _distances(candidates, stacks["reference"], k, settings, "reference")[:, k - 1]
        tiny = np.finfo(np.float64).tiny  # a copy at distance 0 is infinitely dense, kept finite and ranked first
        statistics = np.log(np.maximum(to_reference, tiny)) - np.log(np.maximum(to_synthetic, tiny))
    else:
        statistics = -to_synthetic
    return statistics[: len(stacks["members"])], statistics[len(stacks["members"]) :]
