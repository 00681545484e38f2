"""Downstream utility: a classifier trained with extra synthetic images, scored on real test images."""

import numpy as np
import pytest
import torch

from medsyn.data import SimulatedBrainMRI
from medsyn.evaluation.downstream import binarise, downstream_utility, roc_auc
from medsyn.evaluation.image_sets import ImageSet


def _simulated(name, seed, n, flip_labels=False):
    data = SimulatedBrainMRI(32, seed=seed).generate(n)
    labels = data["labels"].astype(np.int64)
    return ImageSet(name, torch.from_numpy(data["images"])[:, None], 1 - labels if flip_labels else labels,
                    ["healthy", "tumor"], name)


def test_roc_auc_is_the_mann_whitney_statistic():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(labels * 0.8, 1.0)
    positive, negative = scores[labels == 1], scores[labels == 0]
    expected = (positive[:, None] > negative[None]).mean()
    assert roc_auc(torch.tensor(scores), torch.tensor(labels), 2) == pytest.approx(expected, abs=1e-6)


def test_more_correctly_labelled_images_raise_test_auc():
    # "Synthetic" images that are in fact more real slices: a 100-image classifier gains clearly from them.
    result = downstream_utility(_simulated("train", 1, 100), _simulated("test", 2, 200),
                                _simulated("generated", 3, 300), steps=300, resamples=200, progress=False)
    real, mixed = result["runs"]["real"], result["runs"]["real + synthetic"]
    assert mixed["train_images"] == 400 and real["auc_ci"][0] <= real["auc"] <= real["auc_ci"][1]
    assert result["auc_gain"] > 0.1 and result["auc_gain_ci"][0] > 0
    assert mixed["auc"] > 0.75


@pytest.mark.slow
def test_mislabelled_synthetic_images_lower_test_auc():
    result = downstream_utility(_simulated("train", 1, 100), _simulated("test", 2, 200),
                                _simulated("generated", 3, 300, flip_labels=True), steps=300, resamples=200,
                                progress=False)
    assert result["auc_gain_ci"][1] < 0


def test_binarise_and_mismatched_classes_are_named():
    image_set = ImageSet("train", torch.zeros(4, 1, 8, 8, dtype=torch.uint8), np.array([0, 1, 2, 3]),
                         ["notumor", "glioma", "meningioma", "pituitary"], "x")
    binary = binarise(image_set, ["glioma", "meningioma", "pituitary"])
    assert binary.labels.tolist() == [0, 1, 1, 1] and binary.class_names[1].startswith("positive")
    with pytest.raises(ValueError, match="not in its classes"):
        binarise(image_set, ["tumour"])
    other = ImageSet("generated", image_set.images, np.array([0, 1, 0, 1]), ["healthy", "tumor"], "y")
    with pytest.raises(ValueError, match="class names differ"):
        downstream_utility(image_set, image_set, other, steps=1, progress=False)
