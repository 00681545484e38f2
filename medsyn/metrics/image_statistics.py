"""Per-image intensity statistics (as in MINIM's table) and the radial power spectrum, real vs generated.

Feature-space metrics can miss what a radiologist sees first: generated scans that are too smooth, too noisy
or too flat. These read it off the pixels. All work on uint8 (N, C, H, W) or float [0, 1] images; RGB is
reduced to luminance (ITU-R BT.601 weights).

- ``snr``: mean / standard deviation of the foreground (pixels above the image's Otsu threshold), the
  deviation floored at 8-bit rounding noise;
- ``contrast``: RMS contrast, the standard deviation of all intensities on [0, 1];
- ``sharpness``: variance of the 4-neighbour Laplacian on [0, 1];
- ``vessel_visibility``: mean Frangi vesselness (dark tubes, scales 1-3 px, scikit-image) of the green channel of
  RGB images, where fundus vessels have the most contrast, or of grayscale images (on brain MRI it reads dark
  tubular structures such as sulci). Frangi's structure constant is fixed (``VESSEL_GAMMA``) rather than set per
  image from its strongest structure, so that fainter vessels score lower;
- ``uniformity``: sum of squared 256-bin histogram frequencies (Gonzalez & Woods; 1 for a flat image).

The five are MINIM's table, in its order.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

STATISTICS = ("snr", "contrast", "sharpness", "vessel_visibility", "uniformity")
#: Frangi scales in pixels: vessels of fundus photographs are 1-6 px wide at 64-256 px.
VESSEL_SIGMAS = (1.0, 2.0, 3.0)
#: Frangi's gamma on [0, 1] intensities: the response grows about in proportion to vessel contrast up to ~0.4.
VESSEL_GAMMA = 0.05
_LUMINANCE = (0.299, 0.587, 0.114)
# The noise floor of 8-bit images (rounding error), so that a flat foreground has a finite SNR.
QUANTISATION_STD = 1 / (255 * 12**0.5)


def luminance(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W) float64 on [0, 1] from uint8 or float (N, 1 or 3, H, W)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    x = images.double() / 255.0 if images.dtype == torch.uint8 else images.double()
    if images.shape[1] == 3:
        x = (x * torch.tensor(_LUMINANCE, dtype=x.dtype).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
    return x[:, 0]


def vessel_channel(images: torch.Tensor) -> np.ndarray:
    """(N, H, W) float64 on [0, 1]: the green channel of RGB images, the only channel of grayscale ones."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    channel = images[:, 1 if images.shape[1] == 3 else 0]
    return (channel.double() / 255.0 if images.dtype == torch.uint8 else channel.double()).numpy()


def vessel_visibility(images: torch.Tensor) -> np.ndarray:
    """Mean Frangi vesselness (dark ridges at ``VESSEL_SIGMAS``) of each image's vessel channel, length N."""
    from skimage.filters import frangi

    return np.array([frangi(image, sigmas=VESSEL_SIGMAS, black_ridges=True, gamma=VESSEL_GAMMA).mean()
                     for image in vessel_channel(images)])


def grey_level_frequencies(gray: torch.Tensor) -> torch.Tensor:
    """(N, 256) share of each image's pixels at each 8-bit grey level, from (N, H, W) on [0, 1]."""
    levels = (gray * 255).round().long().clamp(0, 255).flatten(1)
    counts = torch.zeros(len(gray), 256, dtype=torch.float64).scatter_add_(
        1, levels, torch.ones_like(levels, dtype=torch.float64))
    return counts / levels.shape[1]


def _otsu(frequencies: torch.Tensor) -> torch.Tensor:
    """The grey level (on [0, 1]) that maximises the between-class variance of each histogram."""
    bins = torch.arange(256, dtype=torch.float64)
    weight = frequencies.cumsum(1)
    mean = (frequencies * bins).cumsum(1)
    total = mean[:, -1:]
    between = (total * weight - mean).square() / (weight * (1 - weight)).clamp(min=1e-12)
    return (between.argmax(1).double() + 0.5) / 255.0


def otsu_thresholds(gray: torch.Tensor) -> torch.Tensor:
    """Per-image Otsu threshold on a 256-bin histogram (maximises the between-class variance)."""
    return _otsu(grey_level_frequencies(gray))


def image_statistics(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Each statistic of each image, as arrays of length N."""
    gray = luminance(images)
    flat = gray.flatten(1)
    frequencies = grey_level_frequencies(gray)
    foreground = flat > _otsu(frequencies)[:, None]
    count = foreground.sum(1).clamp(min=2)
    mean = (flat * foreground).sum(1) / count
    std = (((flat - mean[:, None]) * foreground).square().sum(1) / (count - 1)).sqrt()
    laplacian = F.conv2d(gray[:, None], torch.tensor([[[[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]]], dtype=gray.dtype))
    return {
        "snr": (mean / std.clamp(min=QUANTISATION_STD)).numpy(),
        "contrast": flat.std(1, unbiased=False).numpy(),
        "sharpness": laplacian.flatten(1).var(1).numpy(),
        "vessel_visibility": vessel_visibility(images),
        "uniformity": frequencies.square().sum(1).numpy(),
    }


def radial_power_spectrum(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean power per spatial frequency ring, averaged over images: (frequencies in cycles/pixel, power).

    Each image's mean is removed first, so the DC term does not swamp the rest. Over-smoothed generators
    lose power at high frequencies; noisy ones have too much.
    """
    gray = luminance(images)
    gray = gray - gray.mean(dim=(1, 2), keepdim=True)
    height, width = gray.shape[-2:]
    power = torch.fft.fft2(gray).abs().square().mean(0) / (height * width)
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
    radius = (fy.square() + fx.square()).sqrt()
    step = 1.0 / max(height, width)
    rings = (radius / step).round().long()
    keep = rings <= max(height, width) // 2  # the corners beyond Nyquist in one axis are left out
    total = torch.zeros(int(rings.max()) + 1, dtype=torch.float64).index_add_(0, rings[keep], power[keep])
    count = torch.zeros_like(total).index_add_(0, rings[keep], torch.ones_like(power[keep]))
    present = count > 0
    return (torch.arange(len(total), dtype=torch.float64)[present] * step).numpy(), (total[present] / count[present]).numpy()
