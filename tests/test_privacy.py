import numpy as np
import pytest
from PIL import Image

from medsyn.data import SimulatedBrainMRI
from medsyn.privacy import calibrate_threshold, memorisation_audit, nearest_neighbours, save_flagged_pairs


def brute_force(queries, references, k):
    q = queries.reshape(len(queries), -1).astype(np.float64) / 255
    r = references.reshape(len(references), -1).astype(np.float64) / 255
    d = np.sqrt(((q[:, None, :] - r[None]) ** 2).mean(-1))
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


def test_blocked_search_agrees_with_brute_force():
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 256, (37, 9, 7), dtype=np.uint8)
    references = rng.integers(0, 256, (23, 9, 7), dtype=np.uint8)
    distances, indices = nearest_neighbours(queries, references, k=3, block_size=8)
    expected_d, expected_i = brute_force(queries, references, 3)
    np.testing.assert_array_equal(indices, expected_i)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-12)


def test_feature_vectors_are_searched_as_they_are():
    rng = np.random.default_rng(2)
    queries, references = rng.normal(size=(12, 5)) * 10, rng.normal(size=(30, 5)) * 10
    distances, indices = nearest_neighbours(queries, references, k=2, block_size=5)
    d = np.sqrt(((queries[:, None] - references[None]) ** 2).mean(-1))
    np.testing.assert_array_equal(indices, np.argsort(d, 1)[:, :2])
    np.testing.assert_allclose(distances, np.sort(d, 1)[:, :2], rtol=1e-6)


def test_exclude_self_skips_only_the_diagonal():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 4, 4), dtype=np.uint8)
    images[7] = images[2]  # a duplicate pair stays each other's neighbour at distance 0
    distances, indices = nearest_neighbours(images, images, k=1, exclude_self=True, block_size=3)
    assert indices[2, 0] == 7 and indices[7, 0] == 2 and distances[2, 0] == 0
    assert all(indices[i, 0] != i for i in range(10))


@pytest.fixture(scope="module")
def slices():
    data = SimulatedBrainMRI(resolution=32, seed=5).generate(290)["images"]
    return {"train": data[:200], "held_out": data[200:260], "novel": data[260:]}


def test_audit_flags_exactly_the_planted_copies(slices):
    train = slices["train"]
    generated = slices["novel"].copy()
    generated[4] = train[17]  # exact copy
    near = train[120].astype(int) + np.random.default_rng(0).integers(-2, 3, train[120].shape)
    generated[11] = np.clip(near, 0, 255).astype(np.uint8)  # copy plus faint noise
    audit = memorisation_audit(generated, train, held_out=slices["held_out"], percentile=1.0, k=2)
    assert not audit.passed
    assert audit.flagged_indices == [4, 11]  # closest first
    assert audit.neighbours[4, 0] == 17 and audit.neighbours[11, 0] == 120
    assert audit.min_distance == 0.0
    assert audit.threshold > 0.01  # different patients' slices are far apart; the noisy copy is within 0.01
    assert sum(audit.histogram_counts) == 30


def test_calibrated_threshold_grows_with_the_percentile(slices):
    thresholds = [calibrate_threshold(slices["held_out"], slices["train"], p) for p in (0, 5, 50, 100)]
    assert thresholds == sorted(thresholds) and thresholds[0] < thresholds[-1]


def test_flagged_pairs_are_written_side_by_side(slices, tmp_path):
    generated = slices["novel"].copy()
    generated[0] = slices["train"][3]
    audit = memorisation_audit(generated, slices["train"], threshold=0.01, k=2)
    assert audit.threshold_source == "fixed" and audit.flagged_indices == [0]
    (path,) = save_flagged_pairs(audit, generated, slices["train"], tmp_path)
    assert np.asarray(Image.open(path)).shape == (32, 3 * 32)
    assert '"passed": false' in audit.to_json()


def test_bad_inputs_are_named(slices):
    with pytest.raises(ValueError, match="same size and channels"):
        nearest_neighbours(slices["novel"], np.zeros((5, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        nearest_neighbours(np.full((2, 4, 4), np.nan), np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="non-empty"):
        nearest_neighbours(np.zeros((0, 4, 4)), np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="held-out real images"):
        memorisation_audit(slices["novel"], slices["train"])
