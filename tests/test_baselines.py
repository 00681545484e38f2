import numpy as np
import pytest

from medsyn.baselines import pixel_noise_baseline
from medsyn.cli import main


def test_noise_has_the_requested_std_where_no_clipping_happens():
    images = np.full((50, 64, 64), 0.5)
    noisy = pixel_noise_baseline(images, sigma=0.1, seed=1)
    assert abs((noisy - 0.5).std() - 0.1) < 0.002
    assert abs((noisy - 0.5).mean()) < 0.002


def test_clipping_matches_the_normal_tail():
    images = np.full((100, 64, 64), 0.5)
    noisy = pixel_noise_baseline(images, sigma=0.3, seed=0)
    assert noisy.min() == 0.0 and noisy.max() == 1.0
    # P(|N(0, 0.3^2)| > 0.5) = 2 * (1 - Phi(0.5 / 0.3)) = 0.0956
    assert abs(np.mean((noisy == 0) | (noisy == 1)) - 0.0956) < 0.003


def test_uint8_in_uint8_out_and_seeded():
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8), dtype=np.uint8)
    a, b = pixel_noise_baseline(images, seed=3), pixel_noise_baseline(images, seed=3)
    assert a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, pixel_noise_baseline(images, seed=4))


@pytest.mark.parametrize("images, message", [(np.array([np.nan]), "NaN"), (np.array([2.0]), r"\[0, 1\]")])
def test_bad_inputs(images, message):
    with pytest.raises(ValueError, match=message):
        pixel_noise_baseline(images)


def test_cli_writes_npz_with_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "real.npz", images=images, labels=np.array([0, 1] * 3), class_names=np.array(["a", "b"]))
    assert main(["pixel-noise-baseline", "--data", str(tmp_path / "real.npz"), "--output-dir", str(tmp_path / "o")]) == 0
    out = np.load(tmp_path / "o" / "pixel_noise_baseline.npz")
    assert out["images"].shape == images.shape and out["labels"].tolist() == [0, 1] * 3
    np.testing.assert_array_equal(out["images"], pixel_noise_baseline(images, sigma=0.3, seed=0))
    assert out["sources"][2].endswith("real.npz#2")
