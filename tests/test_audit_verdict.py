"""The audit's verdict on every input it may be given: one representation, exact search, a statistical pass rule,
calibration that leaks cannot fool. Each defect of issue 11's audit list has a test here that failed before."""

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from medsyn.data import SimulatedBrainMRI
from medsyn.privacy import (
    as_image_stack,
    data_copying_test,
    flagged_count_test,
    memorisation_audit,
    nearest_neighbours,
)

SHARED = Path(os.environ.get("MEDSYN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
BRAIN_MRI = SHARED / "data" / "brain_tumor_mri" / "brain_tumor_mri_4class_128.npz"


@pytest.fixture(scope="module")
def slices():
    data = SimulatedBrainMRI(resolution=32, seed=7).generate(1900)["images"]
    return {"train": data[:600], "held_out": data[600:900], "novel": data[900:]}


def _representations(uint8_nhwc: np.ndarray):
    """The same images as a pipeline, numpy or torch user might hold them."""
    floats64 = uint8_nhwc / 255.0
    yield "uint8 NHWC", uint8_nhwc
    yield "float64 NHWC", floats64
    yield "float32 NHWC", uint8_nhwc.astype(np.float32) / 255
    yield "float16 NHWC", floats64.astype(np.float16)
    yield "torch uint8 NCHW", torch.from_numpy(uint8_nhwc).permute(0, 3, 1, 2)
    yield "torch float32 NCHW", torch.from_numpy(uint8_nhwc).permute(0, 3, 1, 2).float() / 255
    if uint8_nhwc.shape[-1] == 1:
        yield "uint8 NHW", uint8_nhwc[..., 0]
        yield "float32 NHW", uint8_nhwc[..., 0].astype(np.float32) / 255


@pytest.mark.parametrize("channels", [1, 3])
def test_a_copy_is_at_distance_zero_whatever_the_dtype_and_layout(channels):
    rng = np.random.default_rng(channels)
    train = rng.integers(0, 256, (40, 12, 10, channels), dtype=np.uint8)
    train[:, :2] = 0  # some structure shared by all images, as a black background
    copies = train[[3, 17, 29]]
    for (copy_name, generated), (train_name, reference) in itertools.product(
            list(_representations(copies)), list(_representations(train))):
        distances, indices = nearest_neighbours(generated, reference, k=1)
        assert indices[:, 0].tolist() == [3, 17, 29], (copy_name, train_name)
        assert distances.max() == 0, (copy_name, train_name, distances.max())
    audit = memorisation_audit(copies / 255.0, train, threshold=0.0, space="pixels")
    assert not audit.passed and audit.near_copy_indices == [0, 1, 2] and audit.min_distance == 0


def test_twelve_bit_scans_keep_their_contrast():
    rng = np.random.default_rng(0)
    scans = rng.integers(0, 4096, (3, 16, 16)).astype(np.uint16)
    stack = as_image_stack(scans, "train")
    assert stack.dtype == torch.uint8 and int(stack.max()) == 255 and int(stack.min()) == 0
    distances, _ = nearest_neighbours(scans[:1], scans, k=1)
    assert distances[0, 0] == 0


@pytest.mark.parametrize(("images", "message"), [
    (np.full((2, 8, 8), 2.0), "divide 0..255 values by 255"),
    (np.full((2, 8, 8), -0.5), r"\(x \+ 1\) / 2"),
    (np.full((2, 8, 8), np.nan), "NaN"),
    (np.zeros((2, 3, 8, 3)), "pass layout"),
    (np.zeros((2, 8, 8, 5)), "no channel axis"),
    (np.zeros((2, 1, 8, 8, 1)), "need an image"),
    (np.zeros((0, 8, 8)), "non-empty"),
    (np.zeros((2, 8, 8), dtype=bool), "boolean masks"),
])
def test_ambiguous_or_invalid_images_are_errors_not_guesses(images, message):
    with pytest.raises(ValueError, match=message):
        as_image_stack(images, "generated")


def test_bad_audit_arguments_are_named(slices):
    for kwargs, message in (({"threshold": float("nan")}, "threshold"), ({"threshold": -1.0}, "threshold"),
                            ({"percentile": float("nan"), "held_out": slices["held_out"]}, "percentile"),
                            ({"alpha": 0.0, "held_out": slices["held_out"]}, "alpha"),
                            ({"max_shift": 1.5, "threshold": 0.1}, "max_shift")):
        with pytest.raises(ValueError, match=message):
            memorisation_audit(slices["novel"][:5], slices["train"], **kwargs)
    with pytest.raises(ValueError, match="same size and channels"):
        memorisation_audit(slices["novel"][:5], np.zeros((5, 16, 16), np.uint8), threshold=0.1)


def test_search_is_exact_among_near_ties():
    """40 references within float32 rounding of each other: the neighbour must be the float64 one."""
    rng = np.random.default_rng(3)
    base = rng.random((1, 64 * 64))
    references = np.clip(base + rng.normal(scale=2e-4, size=(40, 64 * 64)), 0, 1).reshape(40, 64, 64)
    queries = np.clip(base + rng.normal(scale=2e-4, size=(20, 64 * 64)), 0, 1).reshape(20, 64, 64)
    difference = queries.reshape(20, 1, -1) - references.reshape(1, 40, -1)
    expected = np.sqrt((difference**2).mean(-1))
    distances, indices = nearest_neighbours(queries, references, k=3, block_size=7)
    np.testing.assert_array_equal(indices, np.argsort(expected, 1, kind="stable")[:, :3])
    np.testing.assert_allclose(distances, np.sort(expected, 1)[:, :3], rtol=1e-12)


def test_search_is_exact_below_float32_resolution():
    """float64 images closer together than float32 can tell: rounding to float32 alone would pick the wrong one."""
    references = np.stack([np.full((8, 8), 0.5), np.full((8, 8), 0.5 + 3.1e-8)])
    distances, indices = nearest_neighbours(np.full((1, 8, 8), 0.5 + 2.9e-8), references, k=2)
    assert indices.tolist() == [[1, 0]]
    np.testing.assert_allclose(distances, [[2e-9, 2.9e-8]], rtol=1e-6)


def test_data_copying_test_matches_scipy():
    rng = np.random.default_rng(0)
    generated, held_out = rng.random(50).round(2), rng.random(70).round(2) + 0.05  # ties included
    ours = data_copying_test(generated, held_out)
    reference = stats.mannwhitneyu(generated, held_out, alternative="less", method="asymptotic")
    assert ours.p_value == pytest.approx(reference.pvalue, rel=1e-10)
    assert ours.statistic < 0


@pytest.mark.parametrize(("flagged", "n", "rank", "m"), [(0, 50, 1, 30), (3, 100, 2, 200), (19, 400, 2, 200)])
def test_flagged_count_test_is_the_beta_binomial_tail(flagged, n, rank, m):
    result = flagged_count_test(flagged, n, rank, m)
    assert result.p_value == pytest.approx(stats.betabinom(n, rank, m - rank + 1).sf(flagged - 1), rel=1e-9)
    assert result.statistic == pytest.approx(n * rank / (m + 1))


def test_flagged_count_test_is_exact_by_simulation():
    """Below the 2nd smallest of 30 held-out values: the beta-binomial must match a simulation of exchangeable
    draws, which is what makes the calibrated threshold's own randomness part of the test."""
    rng = np.random.default_rng(1)
    counts = []
    for _ in range(4000):
        values = rng.random(30 + 20)
        counts.append(int((values[30:] < np.sort(values[:30])[1]).sum()))
    simulated = np.mean(np.array(counts) >= 4)
    assert simulated == pytest.approx(flagged_count_test(4, 20, 2, 30).p_value, abs=0.015)


def test_fresh_draws_pass_at_the_nominal_rate():
    """Training, held-out and generated sets drawn from one distribution: the old rule failed 20 of 20 runs."""
    passed = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        images = rng.random((900, 6, 6))
        passed += memorisation_audit(images[500:], images[:300], held_out=images[300:500], max_shift=0,
                                     space="pixels").passed
    assert passed >= 90


def test_planted_copies_are_always_flagged_and_one_in_a_thousand_fails(slices):
    rng = np.random.default_rng(0)
    train, held_out, generated = slices["train"], slices["held_out"], slices["novel"]
    assert len(generated) == 1000 and memorisation_audit(generated, train, held_out=held_out, space="pixels").passed
    exact = audit_with(generated, train, held_out, {417: train[5]})
    assert not exact.passed and exact.near_copy_indices == [417] and 417 in exact.flagged_indices
    shifted = np.roll(train[8], 1, axis=1).astype(int) + rng.integers(-3, 4, train[8].shape)
    moved = audit_with(generated, train, held_out, {90: np.clip(shifted, 0, 255), 91: np.roll(train[9], -1, 0)})
    assert set(moved.flagged_indices[:2]) == {90, 91} and moved.nearest_indices[[90, 91]].tolist() == [8, 9]
    # by plain distance they were as far from their originals as other patients' slices are
    assert min(moved.distances[90, 0], moved.distances[91, 0]) > moved.threshold


def audit_with(generated, train, held_out, planted):
    generated = generated.copy()
    for index, image in planted.items():
        generated[index] = image
    return memorisation_audit(generated, train, held_out=held_out, space="pixels")


def test_many_near_copies_fail_the_statistical_tests(slices):
    """Pixel space: images each a little off a training image (noise too strong to count as copies there) still
    sit closer to the training set than held-out patients do: the tests catch what no single distance does. (By
    structure they are copies: test_copy_detection.)"""
    rng = np.random.default_rng(2)
    generated = slices["novel"][:500].copy()
    noisy = slices["train"][:100].astype(int) + rng.normal(0, 9, slices["train"][:100].shape)
    generated[:100] = np.clip(noisy, 0, 255)[:100]
    audit = memorisation_audit(generated, slices["train"], held_out=slices["held_out"], space="pixels")
    assert not audit.near_copy_indices and not audit.passed
    assert audit.data_copying_p_value < 1e-3 and audit.flagged_p_value < 1e-3


def test_overlapping_held_out_set_cannot_collapse_the_threshold(slices):
    train = slices["train"]
    with pytest.raises(ValueError, match="overlaps the training set"):
        memorisation_audit(train[:10].copy(), train, held_out=train)
    leaky = np.concatenate([slices["held_out"][:100], train[:25]])
    with pytest.warns(UserWarning, match="25 of 125 images are near-copies"):
        audit = memorisation_audit(slices["novel"], train, held_out=leaky)
    assert audit.held_out_duplicates_excluded == 25 and audit.held_out_used == 100 and audit.threshold > 0.01
    assert audit.held_out_excluded_indices == list(range(100, 125))


@pytest.mark.skipif(not BRAIN_MRI.exists(), reason=f"the shared brain MRI set is not at {BRAIN_MRI}")
def test_the_public_brain_mri_splits_leak_and_are_excluded():
    with np.load(BRAIN_MRI) as archive:
        split = archive["split"].astype(str)
        images = archive["images"]
    train, test = images[split == "training"], images[split == "testing"]
    with pytest.warns(UserWarning, match="near-copies of training images") as caught:
        audit = memorisation_audit(test[1::2], train, held_out=test[::2], max_shift=0)
    assert audit.held_out_duplicates_excluded > 0 and "excluded" in str(caught[0].message)
    # the generated stand-in (the other half of the test split) leaks too: its copies fail the audit
    assert not audit.passed and audit.near_copy_indices
