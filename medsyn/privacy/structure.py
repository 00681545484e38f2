"""Copy detection that a brightness change, a slight blur, added noise, a one-pixel move or a mirror cannot hide.

Plain RMS distance reads image statistics as much as content: blurring a generated set shrinks its distances to
everything (a fresh-draw generator then "copies"), noise grows them (a copy then passes), and a copy moved by a
pixel is as far from its source as another patient's slice. Here two images are compared by their structure:

1. Each is low-passed (a Gaussian of ``STRUCTURE_BLUR_SIGMA`` pixels), which leaves anatomy and removes most
   pixel noise and the difference a 0.5-pixel blur makes;
2. made zero-mean and unit-norm, which removes brightness and contrast (any affine change of intensity);
3. the training image may move by up to ``max_shift`` pixels and be mirrored left-right (on by default: a scan's
   mirror is the same patient), searched exactly as in ``shift_tolerant_nearest``;
4. the noise a generated image carries beyond the training images' own (Immerkaer's estimator, robust form, less
   what clipping at black or white removes) is taken out of its norm, so noise neither hides a copy nor helps a
   set pass.

The structural distance is sqrt(2 - 2 cos) of the two vectors, 0 for a copy. The audit decides on the relative
distance of Carlini et al. (2023, "Extracting training data from diffusion models"): the distance to the nearest
training image over the mean distance to the ``RELATIVE_NEIGHBOURS`` nearest. A copy sits far closer to its
source than to anything else; a fresh image sits about as close to its nearest training image as to the next
ones; and a global change of sharpness scales all of an image's distances alike, which the ratio cancels. This
follows copy-detection practice for diffusion models (Somepalli et al. 2023 compare normalised descriptors;
Dar et al. 2024 and Akbar et al. 2023 use correlation-type similarity on medical images).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .image_arrays import as_image_stack
from .nearest_neighbours import (
    PreparedReferences,
    _overlap,
    _shifted,
    distinct_nearest,
    nearest_neighbours,
    one_pixel_moves,
)

STRUCTURE_BLUR_SIGMA = 1.0
"""Low-pass width in pixels: nuisances (noise, a 0.5-pixel blur) are defined in pixels, so the width is too."""
RELATIVE_NEIGHBOURS = 10
"""Training neighbours whose mean distance is the relative distance's denominator."""
STRUCTURE_COPY_RATIO = 0.5
"""Relative distance under which a generated image is a copy. Measured (RESULTS.md, "Copy detection under
nuisances"): copies with any one nuisance of issue 37 (noise sd 10 grey levels, +-5% brightness or contrast, a
0.5-pixel blur, a 1-pixel move, a mirror) reach at most 0.45 on real brain MRI at 32 px; fresh simulated draws
come no closer than 0.70 at 32-64 px (0.46 at 16 px, where a few fresh draws are taken for copies)."""
MATCHING_ROUNDS = 3
"""Rounds of ``with_matched_noise``'s correction for what clipping hides from the noise estimate."""
MIN_SIGNAL_SHARE = 0.05
"""Noise debiasing never takes more than 95% of an image's energy (a flat, noisy image stays comparable)."""
_NOISE_KERNEL = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], dtype=torch.float64)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """(size, size) matrix that applies the Gaussian along one axis, edges replicated."""
    kernel = _gaussian_kernel(sigma)
    radius = len(kernel) // 2
    matrix = torch.zeros(size, size, dtype=torch.float64)
    for offset, weight in zip(range(-radius, radius + 1), kernel):
        columns = (torch.arange(size) + offset).clamp(0, size - 1)
        matrix[torch.arange(size), columns] += weight
    return matrix


def low_pass(images: torch.Tensor, sigma: float = STRUCTURE_BLUR_SIGMA) -> torch.Tensor:
    """(N, C, H, W) float images through a separable Gaussian of ``sigma`` pixels, edges replicated: two matrix
    products (several times faster than a convolution on the CPU)."""
    height, width = images.shape[-2:]
    rows, columns = (_blur_matrix(n, sigma).to(images) for n in (height, width))
    return rows @ images @ columns.T


def noise_variance(images: torch.Tensor) -> torch.Tensor:
    """Per-image pixel-noise variance of (N, C, H, W) float images on [0, 1]: Immerkaer's (1996) second-difference
    filter, which cancels smooth content, read robustly (the median absolute response, so edges count little).
    White noise of sd s gives responses of sd 6 s."""
    kernel = _NOISE_KERNEL.to(images).view(1, 1, 3, 3).expand(images.shape[1], 1, 3, 3)
    response = F.conv2d(images, kernel, groups=images.shape[1]).flatten(1).abs()
    return (1.4826 * response.median(dim=1).values.double() / 6) ** 2


def noise_energy(images: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """The summed pixel variance that added noise of ``variance`` (per image) leaves in (N, C, H, W) images on
    [0, 1]: noise on a black (or white) region is clipped there, which keeps about a third of its variance
    (max(0, z) has variance 1/2 - 1/(2 pi)); about half of such pixels read exactly 0 (or 1), so each one counted
    stands for two pixels at that reduced variance."""
    clipped = ((images <= 0) | (images >= 1)).flatten(1).sum(1).double()
    kept = 0.5 - 1 / (2 * np.pi)
    pixels = (images[0].numel() - 2 * (1 - kept) * clipped).clamp(min=0)
    return variance * pixels


def _kernel_energy(sigma: float) -> float:
    """The share of white noise's variance a pixel keeps after ``low_pass``: the 2-D kernel's sum of squares."""
    return float(_gaussian_kernel(sigma).square().sum()) ** 2


def structure_vectors(
    images: torch.Tensor, excess_noise: torch.Tensor | None = None, sigma: float = STRUCTURE_BLUR_SIGMA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W, C) images on [0, 1] as (N, D) structure vectors: low-passed, zero-mean, divided by their norm less
    the energy of ``excess_noise`` (per image, summed pixel variance as ``noise_energy``
    gives; None for none). Returns the vectors (float32) and
    how far each squared norm exceeds 1 (0 without noise), which the distance subtracts."""
    planes = low_pass(images.permute(0, 3, 1, 2).float(), sigma).flatten(1)
    planes = planes - planes.mean(dim=1, keepdim=True)
    energy = planes.double().square().sum(1)
    noise = torch.zeros_like(energy) if excess_noise is None else excess_noise * _kernel_energy(sigma)
    norm = (energy - noise).clamp(min=MIN_SIGNAL_SHARE * energy).sqrt().clamp(min=1e-12)
    vectors = (planes.double() / norm[:, None]).float()
    return vectors, (vectors.double().square().sum(1) - 1).clamp(min=0)


STRUCTURE_CACHE_BYTES = 4 * 1024**3
"""A ``StructureIndex`` keeps every move's prepared reference vectors (twice: stored and centred, float32) when
they fit in this many bytes (1,500 training images of 128 x 128 with mirrors: 3.5 GB); a larger index prepares
each move again for every search."""


class StructureIndex:
    """Reference images prepared for structural search (module docstring): each is compared at its best move
    within ``max_shift`` pixels and, with ``mirror``, its better side. Exact: every move of every (mirrored)
    reference is searched with ``nearest_neighbours``, the moved reference compared where it overlaps the query,
    the uncovered band blanked in both before the low-pass.

    Preparing a move (low-pass and normalise every reference) costs far more than searching it, so the prepared
    vectors are kept when they fit in ``cache_bytes``: a service's QA gate or an audit that searches twice pays
    once.
    """

    def __init__(self, references: np.ndarray | torch.Tensor, max_shift: int = 1, mirror: bool = True,
                 sigma: float = STRUCTURE_BLUR_SIGMA, cache_bytes: int = STRUCTURE_CACHE_BYTES,
                 device: torch.device | str | None = None):
        images = as_image_stack(references, "references")
        self.device = device
        self.image_shape = tuple(images.shape[1:])
        self.count, self.mirror, self.sigma = len(images), mirror, sigma
        self.moves = [(0, 0), *one_pixel_moves(max_shift)]
        images = _unit_float(images)
        self._images = torch.cat([images, images.flip(2)]) if mirror else images  # width is axis 2
        # The references' own noise level: queries are debiased only for noise beyond it.
        self.noise_baseline = noise_variance(self._images.permute(0, 3, 1, 2)).median()
        cached = 2 * len(self.moves) * self._images[0].numel() * len(self._images) * 4 <= cache_bytes
        self._prepared_moves = [self._prepared(move) for move in self.moves] if cached else None

    def __len__(self) -> int:
        return self.count

    @property
    def cached(self) -> bool:
        return self._prepared_moves is not None

    def _prepared(self, move: tuple[int, int]) -> PreparedReferences:
        return PreparedReferences.of_vectors(structure_vectors(_shifted(self._images, *move), None, self.sigma)[0],
                                             self.device)

    def nearest(self, queries: np.ndarray | torch.Tensor, k: int = 1, **search) -> tuple[np.ndarray, np.ndarray]:
        """Each query's k nearest references by structural distance: distances (N, k) ascending in [0, 2] and
        indices (N, k) into the references. ``search`` goes to ``nearest_neighbours``."""
        q = as_image_stack(queries, "queries")
        if tuple(q.shape[1:]) != self.image_shape:
            raise ValueError(f"images differ in (height, width, channels): queries {tuple(q.shape[1:])}, references "
                             f"{self.image_shape}; same size and channels needed")
        q = _unit_float(q)
        k = min(k, self.count)
        planes = q.permute(0, 3, 1, 2)
        # Noise the queries carry beyond the references' own (their texture reads as noise to the estimator too).
        excess = noise_energy(planes, (noise_variance(planes) - self.noise_baseline).clamp(min=0))
        per_move = min(len(self._images), 2 * k if self.mirror else k)  # a reference and its mirror may both rank
        found = []
        for number, (dy, dx) in enumerate(self.moves):
            vectors, surplus = structure_vectors(_overlap(q, dy, dx), excess, self.sigma)
            moved = self._prepared_moves[number] if self.cached else self._prepared((dy, dx))
            distances, indices = nearest_neighbours(vectors, moved, k=per_move, **search)
            squared = distances**2 * vectors.shape[1] - surplus.numpy()[:, None]  # ||a - b||^2 - (||a||^2 - 1)
            found.append((np.sqrt(np.clip(squared, 0, None)), indices % self.count))
        return distinct_nearest(np.concatenate([d for d, _ in found], 1), np.concatenate([i for _, i in found], 1), k)


def with_matched_noise(held_out: torch.Tensor, generated: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``held_out`` (N, H, W, C) with Gaussian noise added so that its median pixel-noise level (Immerkaer) matches
    ``generated``'s; as it is when the generated images are no noisier.

    The structural distance discounts a generated image's excess noise on average, but its nearest training image
    is the best of many, and noise helps pick it: noisy fresh images come out nearer than clean held-out ones, most
    at small sizes (16 px: 0.32 of noised fresh-draw sets passed). Held-out images given the same noise meet the
    same selection, so the comparison is fair again."""
    held, made = (_unit_float(x).permute(0, 3, 1, 2) for x in (held_out, generated))
    target, own = float(noise_variance(made).median()), float(noise_variance(held).median())
    if target <= own:
        return held_out
    noise = torch.randn(held.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    variance = target - own
    for _ in range(MATCHING_ROUNDS):  # clipping at black hides part of the noise from the estimate: scale up
        noisy = (held.double() + noise * variance**0.5).clamp(0, 1).float()
        reached = float(noise_variance(noisy).median()) - own
        variance *= (target - own) / max(reached, 1e-12)
    return (held.double() + noise * variance**0.5).clamp(0, 1).float().permute(0, 2, 3, 1)


def _unit_float(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) images as float32 on [0, 1]; uint8 through float64, so a float64 copy of a uint8 image (as a
    pipeline returns it) comes out bit-identical."""
    return (images.double() / 255 if images.dtype == torch.uint8 else images).float()


def structural_nearest(
    queries: np.ndarray | torch.Tensor,
    references: np.ndarray | torch.Tensor | StructureIndex,
    max_shift: int = 1,
    k: int = 1,
    mirror: bool = True,
    sigma: float = STRUCTURE_BLUR_SIGMA,
    **search,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query, its k nearest references by structural distance (``StructureIndex``; a prepared index may
    be given as ``references``, whose own ``max_shift``, ``mirror`` and ``sigma`` then apply).

    Returns distances (N, k) ascending in [0, 2] and indices (N, k) into ``references``.
    """
    index = references if isinstance(references, StructureIndex) else StructureIndex(
        references, max_shift, mirror, sigma, cache_bytes=0, device=search.pop("device", None))
    return index.nearest(queries, k, **search)


def relative_distances(distances: np.ndarray) -> np.ndarray:
    """Carlini et al.'s relative distance: each row's nearest distance over the mean of the row ((N, k) ascending,
    the k nearest). 0 for a copy; near 1 when the nearest is no closer than the next ones."""
    mean = distances.mean(axis=1)
    return np.divide(distances[:, 0], mean, out=np.zeros(len(distances)), where=mean > 0)
