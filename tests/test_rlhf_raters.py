"""Unattended raters: ``--rater module:function`` resolves or says why not, ratings are checked per aspect, and the
classifier stand-in rates prompt match by the prompted class's probability, quality by the most likely class's, and
fails blank images."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from medsyn.evaluation.generation_accuracy import ExpertClassifier
from medsyn.metrics.features import PooledImageEncoder
from medsyn.rlhf.raters import ClassifierStandInRater, checked_ratings, load_rater
from medsyn.rlhf.ratings import Aspect


class BrightnessClassifier(nn.Module):
    """p(bright) = sigmoid(16 (mean intensity - 0.5)): a classifier whose confidence the test knows exactly."""

    config = SimpleNamespace(num_labels=2, id2label={0: "dark", 1: "bright"}, num_channels=1)

    def forward(self, pixel_values):
        mean = pixel_values.mean(dim=(1, 2, 3))
        return SimpleNamespace(logits=torch.stack([8 * (0.5 - mean), 8 * (mean - 0.5)], dim=1))


def stand_in(**options) -> ClassifierStandInRater:
    model = BrightnessClassifier()
    return ClassifierStandInRater(ExpertClassifier(model, PooledImageEncoder(model)), **options)


def scans(*levels: float) -> torch.Tensor:
    texture = torch.rand(len(levels), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.1 - 0.05
    return torch.tensor(levels).reshape(-1, 1, 1, 1) + texture


def test_the_stand_in_rates_prompt_match_by_the_prompted_class_and_quality_by_the_likeliest():
    rater = stand_in()
    images = scans(0.9, 0.55, 0.9, 0.1)
    prompts = ["a bright scan", "a bright scan", "a dark scan", "a dark scan"]
    # p(bright) = sigmoid(6.4) ~ 1 -> 3; sigmoid(0.8) = 0.69 -> 2; the wrong class -> 1; p(dark) ~ 1 -> 3
    # quality ignores the prompt: the third image is a clear bright scan, so 3 although it was asked to be dark
    expected = {Aspect.PROMPT_MATCH: [3, 2, 1, 3], Aspect.QUALITY: [3, 2, 3, 3]}
    assert checked_ratings(rater, images, prompts) == expected
    flat = torch.full((1, 1, 8, 8), 0.9)
    assert rater(flat, ["a bright scan"]) == {"prompt_match": [1], "quality": [1]}  # blank: poor whatever it shows
    assert checked_ratings(rater, (images * 255).round().clamp(0, 255).to(torch.uint8), prompts) == expected
    assert rater.rater_id == "stand-in:dark/bright"
    with pytest.raises(ValueError, match="names 0 of the classes"):
        rater(images[:1], ["a grey scan"])
    assert stand_in(class_of_prompt={"a grey scan": "dark"})(scans(0.1), ["a grey scan"])["prompt_match"] == [3]


def test_rater_specs_and_ratings_are_checked():
    assert load_rater("medsyn.rlhf.raters:checked_ratings") is checked_ratings
    with pytest.raises(ValueError, match="expected module:function"):
        load_rater("medsyn.rlhf.raters")
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        load_rater("no_such_module:rate")
    with pytest.raises(ValueError, match="has no 'nothing'"):
        load_rater("medsyn.rlhf.raters:nothing")
    with pytest.raises(ValueError, match="is not callable"):
        load_rater("medsyn.rlhf.raters:__doc__")
    images = torch.zeros(2, 1, 4, 4)
    # one list is an overall judgement: the same ratings for both aspects
    assert checked_ratings(lambda images, prompts: [1, 3], images, ["a", "b"]) == dict.fromkeys(Aspect, [1, 3])
    with pytest.raises(ValueError, match="gave quality ratings \\[0, 4\\]"):
        checked_ratings(lambda images, prompts: [0, 4], images, ["a", "b"])
    with pytest.raises(ValueError, match="gave 1 quality ratings for 2 images"):
        checked_ratings(lambda images, prompts: [2], images, ["a", "b"])
    with pytest.raises(ValueError, match="gave 1 prompt_match ratings for 2 images"):
        checked_ratings(lambda images, prompts: {"quality": [2, 2], "prompt_match": [2]}, images, ["a", "b"])
    with pytest.raises(ValueError, match="rated aspects \\['quality'\\]"):
        checked_ratings(lambda images, prompts: {"quality": [2, 2]}, images, ["a", "b"])
    with pytest.raises(ValueError, match="rated aspects \\['prompt_match', 'realism'\\]"):
        checked_ratings(lambda images, prompts: {"realism": [2, 2], "prompt_match": [2, 2]}, images, ["a", "b"])
    with pytest.raises(ValueError, match="need 0 < fair < good"):
        stand_in(good=0.4)
