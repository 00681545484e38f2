import numpy as np
import pytest
from scipy import linalg

from medsyn.data import SimulatedBrainMRI
from medsyn.metrics import fit_label_probe, frechet_distance, label_probe_report


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    # For diagonal covariances: ||mu_a - mu_b||^2 + sum (sqrt(var_a) - sqrt(var_b))^2.
    rng = np.random.default_rng(0)
    std_a, std_b = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    a = rng.standard_normal((200_000, 3)) * std_a
    b = rng.standard_normal((200_000, 3)) * std_b + np.array([1.0, 0.0, -1.0])
    expected = 2.0 + ((std_a - std_b) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.01)


def test_frechet_distance_matches_scipy_sqrtm_for_correlated_features():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6))
    b = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) + 0.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)


@pytest.fixture(scope="module")
def probe_and_real():
    train = SimulatedBrainMRI(resolution=32, seed=0).generate(1000)
    probe = fit_label_probe(train["images"], train["labels"], num_classes=2, epochs=20)
    held = SimulatedBrainMRI(resolution=32, seed=99).generate(200)
    return probe, held


def test_probe_separates_real_classes_and_flags_noise(probe_and_real):
    probe, held = probe_and_real
    names = ["healthy", "tumor"]
    # Real images posing as generated ones: agreement near the probe's accuracy, distance near the floor.
    as_generated = label_probe_report(probe, held["images"][:64], held["labels"][:64], held["images"][64:],
                                      held["labels"][64:], names)
    assert min(as_generated.real_class_agreement.values()) > 0.7
    assert min(as_generated.class_agreement.values()) > 0.6
    # Noise with the images' mean and std is far from them in the probe's feature space.
    rng = np.random.default_rng(0)
    noise = rng.normal(held["images"].mean(), held["images"].std(), (64, 32, 32)).clip(0, 255).astype(np.uint8)
    as_noise = label_probe_report(probe, noise, held["labels"][:64], held["images"][64:], held["labels"][64:], names)
    assert as_noise.frechet_distance > 5 * as_generated.frechet_distance
    assert as_generated.frechet_distance < 3 * as_generated.real_frechet_distance


def test_bad_inputs_are_named(probe_and_real):
    probe, held = probe_and_real
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((4, 3), np.nan), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="at least 128 real"):
        label_probe_report(probe, held["images"][:64], held["labels"][:64], held["images"][:100],
                           held["labels"][:100], ["healthy", "tumor"])
    with pytest.raises(ValueError, match="NaN"):
        fit_label_probe(np.full((4, 8, 8), np.nan), np.zeros(4, dtype=int), num_classes=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        fit_label_probe(np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 2, 0]), num_classes=2)
