"""FID, KID, precision/recall, density/coverage and realism against formulas and known cases."""

import numpy as np
import pytest
import torch
from scipy import linalg

from medsyn.metrics import frechet_distance, kernel_distance
from medsyn.metrics.manifold import knn_radii, manifold_metrics, realism_scores


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    # For diagonal covariances: ||mu_a - mu_b||^2 + sum (sqrt(var_a) - sqrt(var_b))^2.
    rng = np.random.default_rng(0)
    std_a, std_b = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    a = rng.standard_normal((200_000, 3)) * std_a
    b = rng.standard_normal((200_000, 3)) * std_b + np.array([1.0, 0.0, -1.0])
    expected = 2.0 + ((std_a - std_b) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.01)


def test_frechet_distance_matches_float64_scipy_reference():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((600, 64)) @ rng.standard_normal((64, 64))
    b = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64)) + 0.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-6 * np.trace(cov_a)


def _unbiased_cubic_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """KID's formula written out: unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
    return off(kxx) + off(kyy) - 2 * kxy.mean()


def test_kernel_distance_matches_its_formula():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((80, 16)), rng.standard_normal((80, 16)) + 0.4
    # Subsets as large as the sets: every subset is the whole set, so the mean is the formula exactly.
    mean, std = kernel_distance(x, y, subsets=3, subset_size=80)
    assert mean == pytest.approx(_unbiased_cubic_mmd(x, y), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kernel_distance_is_seeded_and_near_zero_for_one_distribution():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    first = kernel_distance(x, y, subsets=20, subset_size=100, seed=7)
    assert first == kernel_distance(x, y, subsets=20, subset_size=100, seed=7)
    far = kernel_distance(x, y + 1.0, subsets=20, subset_size=100, seed=7)
    assert abs(first[0]) < 3 * first[1] + 1e-3 and far[0] > 20 * abs(first[0])


def _gaussians(n=1500, d=8, seed=4):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator), torch.randn(n, d, generator=generator)


def test_precision_recall_on_identical_disjoint_and_collapsed_sets():
    real, other = _gaussians()
    same = manifold_metrics(real, real)
    assert (same.precision, same.recall, same.coverage) == (1.0, 1.0, 1.0)
    disjoint = manifold_metrics(real, other + 50.0)
    assert (disjoint.precision, disjoint.recall, disjoint.density, disjoint.coverage) == (0.0, 0.0, 0.0, 0.0)
    # A generator collapsed near the mode: every sample looks real, little of the variety is covered.
    collapsed = manifold_metrics(real, other * 0.2)
    assert collapsed.precision > 0.99 and collapsed.recall < 0.05


def test_density_and_coverage_for_one_distribution_match_naeem_et_al():
    # Two samples of one distribution: E[density] = 1, and coverage -> 1 - 1/2^k for equal sizes, with Naeem et
    # al.'s k = 5 by default while precision/recall keep k = 3.
    real, generated = _gaussians(n=2000)
    metrics = manifold_metrics(real, generated)
    assert (metrics.k, metrics.k_density) == (3, 5)
    assert metrics.density == pytest.approx(1.0, abs=0.1)
    assert metrics.coverage == pytest.approx(1 - 0.5**5, abs=0.02)
    assert 0.6 < metrics.precision < 0.95 and 0.6 < metrics.recall < 0.95
    assert manifold_metrics(real, generated, k_density=3).coverage == pytest.approx(1 - 0.5**3, abs=0.04)


def test_each_metric_uses_its_own_k_as_brute_force_says():
    real, generated = _gaussians(n=200, d=3)
    real, generated = real.double(), generated[:150].double()

    def radii(x, k):
        distances = torch.cdist(x, x)
        distances.fill_diagonal_(float("inf"))
        return distances.sort(1).values[:, k - 1]

    cross = torch.cdist(generated, real)
    inside3, inside5 = cross <= radii(real, 3)[None], cross <= radii(real, 5)[None]
    metrics = manifold_metrics(real, generated, k=3, k_density=5)
    assert metrics.precision == pytest.approx(inside3.any(1).double().mean().item())
    assert metrics.recall == pytest.approx((cross <= radii(generated, 3)[:, None]).any(0).double().mean().item())
    assert metrics.density == pytest.approx(inside5.sum().item() / (5 * len(generated)))
    assert metrics.coverage == pytest.approx(inside5.any(0).double().mean().item())


def test_knn_radii_agree_with_brute_force():
    real, _ = _gaussians(n=300, d=5)
    distances = torch.cdist(real.double(), real.double())
    distances.fill_diagonal_(float("inf"))
    expected = distances.sort(1).values[:, 2]
    assert torch.allclose(knn_radii(real.double(), 3), expected)


def test_realism_singles_out_an_outlier():
    real, generated = _gaussians(n=500)
    generated = generated[:20].clone()
    generated[7] += 10.0
    scores = realism_scores(real, generated)
    assert scores.argmin() == 7 and scores[7] < 0.5 and np.median(scores) > 0.8


def test_bad_feature_inputs_are_named():
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((4, 3), np.nan), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="at least 6 samples"):
        manifold_metrics(np.zeros((5, 2)), np.zeros((10, 2)), k=3)


def test_a_saved_domain_encoder_sees_images_at_the_side_it_was_trained_at(tmp_path):
    """``evaluate --domain-encoder`` loads through ``PooledImageEncoder.from_pretrained``: images of any size are
    resized to the saved resolution (config ``image_size``, else the image processor's size) before the features."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    from medsyn.metrics.features import PooledImageEncoder

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    backbone = ResNetModel(config).eval()
    images = torch.rand(2, 1, 16, 16)
    at_32 = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = backbone(pixel_values=(at_32 - 0.5) / 0.5).pooler_output.flatten(1)
    for name, size_in_config in (("config", True), ("processor", False)):
        config.image_size = 32 if size_in_config else None
        backbone.save_pretrained(tmp_path / name)
        processor_size = {"shortest_edge": 64 if size_in_config else 32}  # the config wins over the processor
        ConvNextImageProcessor(size=processor_size, image_mean=[0.5], image_std=[0.5]).save_pretrained(tmp_path / name)
        encoder = PooledImageEncoder.from_pretrained(str(tmp_path / name)).eval()
        assert encoder.image_size == 32
        with torch.no_grad():
            torch.testing.assert_close(encoder(images), expected, atol=1e-5, rtol=1e-5)
