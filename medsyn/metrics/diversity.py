"""Diversity as mean pairwise MS-SSIM within a set (lower = more varied); SSIM for paired comparisons.

A generator that collapses onto a few modes makes its images alike: their pairwise MS-SSIM rises above the
real images' own. MS-SSIM needs the image to survive its downsamplings, so small images use fewer scales:
the largest number of the standard five (Wang et al. 2003 weights, renormalised) that torchmetrics accepts for
the size, and the result records how many were used. The same pairs procedure runs on the real set, which
gives the number to compare with.
"""

from __future__ import annotations

import torch

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
KERNEL_SIZE = 11
PAIR_BATCH = 64


def ms_ssim_scales(size: int, kernel_size: int = KERNEL_SIZE) -> int:
    """The most MS-SSIM scales (<= 5) an image of ``size`` pixels supports (torchmetrics' size rule)."""
    for scales in range(len(MS_SSIM_BETAS), 0, -1):
        if size >= 2**scales and size // max(1, scales - 1) ** 2 > kernel_size - 1:
            return scales
    raise ValueError(f"images of {size} px are too small for SSIM with an {kernel_size}-pixel window")


def _as_unit_float(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def paired_ms_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MS-SSIM of each pair (a[i], b[i]), images uint8 or float in [0, 1], (N, C, H, W)."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

    a, b = _as_unit_float(a), _as_unit_float(b)
    scales = ms_ssim_scales(min(a.shape[-2:]))
    betas = MS_SSIM_BETAS if scales == len(MS_SSIM_BETAS) else tuple(
        beta / sum(MS_SSIM_BETAS[:scales]) for beta in MS_SSIM_BETAS[:scales])
    return ms_ssim(a, b, data_range=1.0, kernel_size=KERNEL_SIZE, betas=betas, reduction="none")


def paired_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of each pair (a[i], b[i]): e.g. an image against its reconstruction or its nearest neighbour."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    return ssim(_as_unit_float(a), _as_unit_float(b), data_range=1.0, reduction="none")


def mean_pairwise_ms_ssim(images: torch.Tensor, max_pairs: int = 1000, seed: int = 0) -> tuple[float, int]:
    """Mean MS-SSIM over distinct random pairs of one set, and the number of scales used.

    All pairs when there are at most ``max_pairs`` of them; else ``max_pairs`` drawn from ``seed``.
    """
    n = len(images)
    if n < 2:
        raise ValueError(f"need at least 2 images for pairwise diversity, got {n}")
    if n * (n - 1) // 2 <= max_pairs:
        first, second = torch.triu_indices(n, n, offset=1)
    else:
        generator = torch.Generator().manual_seed(seed)
        first = torch.randint(n, (max_pairs,), generator=generator)
        second = (first + torch.randint(1, n, (max_pairs,), generator=generator)) % n  # never the same image
    values = torch.cat([
        paired_ms_ssim(images[first[i : i + PAIR_BATCH]], images[second[i : i + PAIR_BATCH]])
        for i in range(0, len(first), PAIR_BATCH)
    ])
    return float(values.mean()), ms_ssim_scales(min(images.shape[-2:]))
