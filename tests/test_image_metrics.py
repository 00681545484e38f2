"""Diversity (MS-SSIM) and pixel statistics against analytic cases and torchmetrics."""

import math

import numpy as np
import pytest
import torch

from medsyn.metrics.diversity import mean_pairwise_ms_ssim, ms_ssim_scales, paired_ms_ssim, paired_ssim
from medsyn.metrics.image_statistics import image_statistics, otsu_thresholds, radial_power_spectrum


def _noise(n, size=64, seed=0):
    return torch.randint(0, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_scales_shrink_with_the_image_and_tiny_images_are_refused():
    assert [ms_ssim_scales(s) for s in (256, 128, 64, 32)] == [5, 4, 3, 2]
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_scales(8)


def test_five_scale_ms_ssim_is_torchmetrics_standard_one():
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    a, b = _noise(2, 192, seed=1), _noise(2, 192, seed=2)
    b = ((a.float() + b.float()) / 2).to(torch.uint8)  # related images, so the value is well above 0
    expected = multiscale_structural_similarity_index_measure(a.float() / 255, b.float() / 255, data_range=1.0,
                                                              reduction="none")
    assert torch.allclose(paired_ms_ssim(a, b), expected)


def test_copies_are_not_diverse_and_noise_is():
    copies = _noise(1).repeat(6, 1, 1, 1)
    assert mean_pairwise_ms_ssim(copies)[0] == pytest.approx(1.0)
    value, scales = mean_pairwise_ms_ssim(_noise(12), max_pairs=20, seed=3)
    assert value < 0.1 and scales == 3
    assert mean_pairwise_ms_ssim(_noise(12), max_pairs=20, seed=3)[0] == value  # seeded pairs
    assert torch.allclose(paired_ssim(copies[:2], copies[:2]), torch.ones(2))
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_ms_ssim(copies[:1])


def test_statistics_of_flat_and_half_split_images():
    images = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    images[0] = 200
    images[1, :, :, 8:] = 255
    stats = image_statistics(images)
    assert stats["uniformity"].tolist() == pytest.approx([1.0, 0.5])  # one grey level; two equally common
    assert stats["contrast"].tolist() == pytest.approx([0.0, 0.5])
    assert stats["sharpness"][0] == 0.0 and stats["sharpness"][1] > 0
    # The white half is the foreground: flat, so its SNR is its mean over 8-bit rounding noise.
    assert stats["snr"][1] == pytest.approx(255 * math.sqrt(12), rel=1e-6)


def test_otsu_splits_a_bimodal_image_between_its_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(60, 5, 500), rng.normal(180, 5, 500)]).clip(0, 255)
    image = torch.tensor(values.reshape(1, 1, 25, 40).round(), dtype=torch.uint8)
    threshold = float(otsu_thresholds(image.double()[:, 0] / 255)[0])
    assert int((image.double() / 255 > threshold).sum()) == 500  # exactly the bright mode is foreground


def test_rgb_is_measured_as_luminance():
    gray = _noise(3)
    assert image_statistics(gray.expand(-1, 3, -1, -1).contiguous())["contrast"] == pytest.approx(
        image_statistics(gray)["contrast"])


def test_power_spectrum_of_white_noise_is_flat_and_a_cosine_peaks_at_its_frequency():
    noise = torch.rand(40, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    frequency, power = radial_power_spectrum(noise)
    assert power[0] == pytest.approx(0.0, abs=1e-12)  # the mean is removed
    assert np.allclose(power[2:], 1 / 12, rtol=0.15)  # uniform noise: variance 1/12 at every frequency
    x = torch.arange(64, dtype=torch.float64)
    wave = (0.5 + 0.4 * torch.cos(2 * math.pi * 8 * x / 64)).expand(64, 64).reshape(1, 1, 64, 64)
    frequency, power = radial_power_spectrum(wave)
    assert frequency[power.argmax()] == pytest.approx(8 / 64)


def _fundus_like(vessels_in: str) -> torch.Tensor:
    """A bright disc-free background with three dark 2 px lines ("vessels") in the named channels."""
    image = torch.full((1, 3, 64, 64), 0.7, dtype=torch.float64)
    for row in (16, 32, 48):
        for channel, name in enumerate("rgb"):
            if name in vessels_in:
                image[0, channel, row : row + 2, 4:60] = 0.3
    return image


def test_vessel_visibility_reads_dark_vessels_in_the_green_channel():
    """MINIM's fifth column: vessels seen where a fundus photograph shows them (green), not elsewhere."""
    green, red, none = (image_statistics(_fundus_like(c))["vessel_visibility"][0] for c in ("g", "r", ""))
    assert none == pytest.approx(0.0, abs=1e-12) and red == pytest.approx(0.0, abs=1e-12)
    assert green > 1e-3
    gray = _fundus_like("g")[:, 1:2]
    assert image_statistics(gray)["vessel_visibility"][0] == pytest.approx(green)  # grayscale: the channel itself
    faint = [image_statistics(0.7 - (0.7 - _fundus_like("g")) * c)["vessel_visibility"][0] for c in (0.5, 0.1)]
    assert 0 < faint[1] < faint[0] < 0.7 * green  # fainter vessels score lower
