import numpy as np
import pytest

from medsyn.data import CLASS_NAMES, SimulatedBrainMRI, simulated_dataset


def test_deterministic_and_prefix_stable():
    a = SimulatedBrainMRI(resolution=64, seed=3).generate(12)
    b = SimulatedBrainMRI(resolution=64, seed=3).generate(5)
    np.testing.assert_array_equal(a["images"][:5], b["images"])
    assert a["captions"][:5] == b["captions"]
    c = SimulatedBrainMRI(resolution=64, seed=4).generate(5)
    assert not np.array_equal(b["images"], c["images"])
    tail = SimulatedBrainMRI(resolution=64, seed=3).generate(4, start=8)
    np.testing.assert_array_equal(a["images"][8:], tail["images"])


@pytest.mark.parametrize("resolution", [64, 128, 256])
def test_resolutions_render_the_same_anatomy(resolution):
    image = SimulatedBrainMRI(resolution=resolution, seed=0)[1].image
    assert image.shape == (resolution, resolution) and image.dtype == np.float32
    reference = SimulatedBrainMRI(resolution=64, seed=0)[1].image
    down = image.reshape(64, resolution // 64, 64, resolution // 64).mean(axis=(1, 3))
    assert np.corrcoef(down.ravel(), reference.ravel())[0, 1] > 0.9


def test_labels_and_captions_agree():
    data = SimulatedBrainMRI(resolution=64, seed=0, tumour_fraction=0.5).generate(200)
    assert 0.35 < data["labels"].mean() < 0.65
    for label, caption, attributes in zip(data["labels"], data["captions"], data["attributes"]):
        if label == 1:
            assert f"{attributes['side']} {attributes['lobe']} tumor" in caption
        else:
            assert "no tumor" in caption
        assert caption.startswith("axial ")
    assert len(set(data["captions"])) > 50  # captions carry the sampled attributes


def test_tumour_masks_match_captions():
    """Radiological convention: the patient's right is the image's left; frontal tumours sit in the upper half."""
    data = SimulatedBrainMRI(resolution=64, seed=0, tumour_fraction=0.5).generate(80)
    for label, mask, attributes in zip(data["labels"], data["tumour_masks"], data["attributes"]):
        if label == 0:
            assert not mask.any()
            continue
        assert mask.sum() >= 4
        rows, cols = np.nonzero(mask)
        if attributes["side"] == "midline":
            assert abs(cols.mean() - 32) < 6
        else:  # head position jitters by about a pixel
            assert cols.mean() < 33 if attributes["side"] == "right" else cols.mean() > 31
        if attributes["lobe"] == "frontal":
            assert rows.mean() < 32
        if attributes["lobe"] == "occipital":
            assert rows.mean() > 32


def test_tumour_is_visible_against_surrounding_brain():
    sim = SimulatedBrainMRI(resolution=64, seed=0, tumour_fraction=1.0)
    contrasts = []
    for i in range(30):
        slice_ = sim[i]
        inside = slice_.image[slice_.tumour_mask].mean()
        rows, cols = np.nonzero(slice_.tumour_mask)
        ring = np.zeros_like(slice_.tumour_mask)
        ring[max(rows.min() - 6, 0) : rows.max() + 7, max(cols.min() - 6, 0) : cols.max() + 7] = True
        contrasts.append(abs(inside - slice_.image[ring & ~slice_.tumour_mask].mean()))
    assert np.median(contrasts) > 0.08


def test_anatomy_varies_between_images():
    images = SimulatedBrainMRI(resolution=64, seed=0, tumour_fraction=0.0).generate(30)["images"].astype(float)
    head_areas = (images > 20).sum(axis=(1, 2))
    assert head_areas.std() / head_areas.mean() > 0.03
    assert min(np.abs(a - b).mean() for a, b in zip(images[:-1], images[1:])) > 3


def test_dataset_schema():
    dataset = simulated_dataset(6, resolution=32)
    assert dataset.features["label"].names == list(CLASS_NAMES)
    assert dataset[0]["image"].mode == "L" and dataset[0]["image"].size == (32, 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"resolution": 8}, "resolution"), ({"tumour_fraction": 1.5}, "tumour_fraction"), ({"contrasts": ("CT",)}, "contrasts")],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimulatedBrainMRI(**kwargs)
