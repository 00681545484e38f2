import numpy as np
import pytest

from medsyn.data import SimulatedBrainMRI
from medsyn.metrics import fit_label_probe, label_probe_report


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
    with pytest.raises(ValueError, match="at least 128 real"):
        label_probe_report(probe, held["images"][:64], held["labels"][:64], held["images"][:100],
                           held["labels"][:100], ["healthy", "tumor"])
    with pytest.raises(ValueError, match="NaN"):
        fit_label_probe(np.full((4, 8, 8), np.nan), np.zeros(4, dtype=int), num_classes=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        fit_label_probe(np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 2, 0]), num_classes=2)
