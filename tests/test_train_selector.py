"""train_selector.py on CPU: learns a rating rule from a ratings file over a rated pool, holds out images (not
ratings), saves a loadable ViT with its accept threshold, metrics and card, and names bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import ViTForImageClassification

from medsyn.rlhf.rating_images import split_by_image
from medsyn.rlhf.ratings import Rating, RatingsFile, image_digest
from medsyn.train_scripts.train_selector import main, parse_args

TINY = ["--patch_size", "4", "--hidden_size", "32", "--num_attention_heads", "2", "--num_hidden_layers", "2",
        "--intermediate_size", "64", "--train_batch_size", "32", "--learning_rate", "1e-3", "--report_to", "none",
        "--validation_steps", "1000", "--checkpointing_steps", "1000", "--seed", "0"]


def rated_pool(tmp_path, count: int = 120) -> tuple[str, str]:
    """A pool of textured images rated by brightness (darkest third 1, middle 2, brightest 3) by two raters."""
    generator = np.random.default_rng(0)
    brightness = generator.random(count)
    images = np.clip(brightness[:, None, None] * 200 + generator.random((count, 16, 16)) * 55, 0, 255).astype(np.uint8)
    np.savez(tmp_path / "samples.npz", images=images, captions=np.array(["a brain MRI"] * count))
    store = RatingsFile(tmp_path / "ratings.jsonl")
    for index, (image, value) in enumerate(zip(images, brightness)):
        rating = 1 + int(value > 1 / 3) + int(value > 2 / 3)
        for rater in ("dr-a", "dr-b") if index % 4 == 0 else ("dr-a",):
            store.append(Rating(image=image_digest(image), prompt="a brain MRI", rating=rating, rater=rater))
    return str(tmp_path / "samples.npz"), str(tmp_path / "ratings.jsonl")


def test_learns_the_rating_rule_and_saves_a_loadable_selector(tmp_path):
    images, ratings = rated_pool(tmp_path)
    model = main(parse_args([*TINY, "--images", images, "--ratings", ratings, "--max_train_steps", "150",
                             "--output_dir", str(tmp_path / "selector")]))
    out = tmp_path / "selector"
    report = json.loads((out / "selector.json").read_text())
    assert report["spearman"] > 0.8 and report["rating_accuracy"] > 0.7 and report["aspect"] == "quality"
    loaded = ViTForImageClassification.from_pretrained(out)
    assert loaded.config.accept_threshold == pytest.approx(report["accept_threshold"])
    assert 0 < report["accept_threshold"] < 1 and (out / "model.safetensors").is_file()
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(loaded(pixel_values=x).logits, model(pixel_values=x).logits)
    card = (out / "README.md").read_text()
    assert "$" not in card and "rlhf" in card and "| Spearman correlation with the ratings |" in card


def test_a_trained_classifiers_backbone_serves_as_the_selector(tmp_path):
    """A saved transformers ResNet classifier (what train_expert.py writes, 4 classes) gets a new one-output head,
    learns the rating rule on its backbone, and saves a folder that loads as an image classifier; its backbone's
    weights are where training took them, not reinitialised."""
    from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

    expert = ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16],
                                                       depths=[1, 1], layer_type="basic", num_labels=4))
    expert.save_pretrained(tmp_path / "expert")
    images, ratings = rated_pool(tmp_path)
    common = [*TINY, "--images", images, "--ratings", ratings, "--image_encoder_name_or_path",
              str(tmp_path / "expert")]
    model = main(parse_args([*common, "--max_train_steps", "150", "--output_dir", str(tmp_path / "selector")]))
    out = tmp_path / "selector"
    report = json.loads((out / "selector.json").read_text())
    assert report["spearman"] > 0.8 and report["rating_accuracy"] > 0.7
    loaded = AutoModelForImageClassification.from_pretrained(out)
    assert type(loaded).__name__ == "ResNetForImageClassification" and loaded.config.num_labels == 1
    assert loaded.config.accept_threshold == pytest.approx(report["accept_threshold"])
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(loaded(pixel_values=x).logits, model(pixel_values=x).logits)
    card = (out / "README.md").read_text()
    assert "ResNetForImageClassification, backbone from expert" in card and "no training scan" not in card

    # one run, where a fresh backbone was loaded but not trained, keeps the expert's weights exactly
    untrained = main(parse_args([*common, "--max_train_steps", "1", "--learning_rate", "1e-12",
                                 "--output_dir", str(tmp_path / "untrained")]))
    stem = "resnet.embedder.embedder.convolution.weight"
    torch.testing.assert_close(untrained.state_dict()[stem], expert.state_dict()[stem], atol=1e-9, rtol=0)

    # a continued selector (the next RLHF round's) still names its backbone
    main(parse_args([*TINY, "--images", images, "--ratings", ratings, "--selector_model_name_or_path", str(out),
                     "--max_train_steps", "1", "--output_dir", str(tmp_path / "continued")]))
    card = (tmp_path / "continued" / "README.md").read_text()
    assert "ResNetForImageClassification, backbone from expert" in card and "no training scan" not in card
    with pytest.raises(SystemExit):  # continue a selector or start one on a backbone, not both
        parse_args([*common, "--selector_model_name_or_path", str(out), "--output_dir", str(tmp_path / "x")])
    ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8], depths=[1],
                                              layer_type="basic")).save_pretrained(tmp_path / "rgb")
    with pytest.raises(ValueError, match="rgb takes 3-channel images; the rated images are 1-channel 16 px"):
        main(parse_args([*TINY, "--images", images, "--ratings", ratings, "--image_encoder_name_or_path",
                         str(tmp_path / "rgb"), "--output_dir", str(tmp_path / "bad")]))
    with pytest.raises(ValueError, match="a selector has one output, this classifier has 4"):
        main(parse_args([*TINY, "--images", images, "--ratings", ratings, "--selector_model_name_or_path",
                         str(tmp_path / "expert"), "--output_dir", str(tmp_path / "bad")]))


def test_images_not_ratings_are_held_out():
    digests = ["a", "a", "b", "c", "c", "c", "d", "e"]
    train, held_out = split_by_image(digests, 0.4, seed=0)
    assert {digests[i] for i in train}.isdisjoint({digests[i] for i in held_out})
    assert len({digests[i] for i in held_out}) == 2 and sorted([*train, *held_out]) == list(range(8))


def test_bad_input_is_named(tmp_path):
    images, ratings = rated_pool(tmp_path, count=12)
    common = [*TINY, "--images", images, "--max_train_steps", "1", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="no prompt_match ratings"):
        main(parse_args([*common, "--ratings", ratings, "--aspect", "prompt_match"]))
    stranger = RatingsFile(tmp_path / "other.jsonl")
    stranger.append(Rating(image=image_digest(np.zeros((16, 16), np.uint8)), prompt="x", rating=2, rater="dr-a",
                           path="elsewhere.png"))
    with pytest.raises(ValueError, match="1 of 1 ratings name images that are not in --images.*elsewhere.png"):
        main(parse_args([*common, "--ratings", str(tmp_path / "other.jsonl")]))
    with pytest.raises(SystemExit):
        parse_args([*common, "--ratings", ratings, "--aspect", "beauty"])
