"""train_policy.py on CPU: stage 1 learns which prompt an image matches from prompt-match ratings, stage 2
continues on the selector's accepted images with the baseline, and both name bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medsyn.rlhf.policy import AlignmentPolicy, ClipAlignmentPolicy
from medsyn.rlhf.ratings import Rating, RatingsFile, image_digest
from medsyn.train_scripts import train_policy, train_selector

TOWERS = ["--patch_size", "4", "--hidden_size", "32", "--num_attention_heads", "2", "--num_hidden_layers", "1",
          "--intermediate_size", "64"]
COMMON = ["--train_batch_size", "32", "--learning_rate", "1e-3", "--report_to", "none", "--validation_steps",
          "1000", "--checkpointing_steps", "1000", "--seed", "0"]


def matched_pool(tmp_path, count: int = 160) -> tuple[str, str]:
    """Bright or dark images, each shown with "a bright scan" or "a dark scan"; the match rating is 3 when they
    agree and 1 when not, and the quality rating follows brightness (for the selector)."""
    rng = np.random.default_rng(0)
    bright = rng.random(count) > 0.5
    images = np.where(bright, 200, 50)[:, None, None] + rng.integers(0, 40, (count, 16, 16))
    images = images.astype(np.uint8)
    prompts = np.where(rng.random(count) > 0.5, "a bright scan", "a dark scan")
    np.savez(tmp_path / "samples.npz", images=images, captions=prompts)
    store = RatingsFile(tmp_path / "ratings.jsonl")
    for image, prompt, is_bright in zip(images, prompts, bright):
        match = 3 if (prompt == "a bright scan") == is_bright else 1
        store.append(Rating(image=image_digest(image), prompt=str(prompt), rating=match, rater="dr-a",
                            aspect="prompt_match"))
        store.append(Rating(image=image_digest(image), prompt=str(prompt), rating=3 if is_bright else 2, rater="dr-a"))
    return str(tmp_path / "samples.npz"), str(tmp_path / "ratings.jsonl")


def test_two_stages_learn_the_match_and_save_a_loadable_policy(tmp_path):
    images, ratings = matched_pool(tmp_path)
    data = ["--images", images, "--ratings", ratings]
    train_policy.main(train_policy.parse_args([*TOWERS, *COMMON, *data, "--max_train_steps", "120",
                                               "--output_dir", str(tmp_path / "stage1")]))
    first = json.loads((tmp_path / "stage1" / "policy.json").read_text())
    assert first["stage"] == 1 and first["match_accuracy"] > 0.85 and first["spearman"] > 0.7
    train_selector.main(train_selector.parse_args([*TOWERS[:-2], "--intermediate_size", "64", *COMMON, *data,
                                                   "--max_train_steps", "60", "--output_dir", str(tmp_path / "sel")]))
    policy = train_policy.main(train_policy.parse_args([
        *COMMON, *data, "--stage", "2", "--selector", str(tmp_path / "sel"), "--policy_model_name_or_path",
        str(tmp_path / "stage1"), "--max_train_steps", "20", "--output_dir", str(tmp_path / "stage2")]))
    second = json.loads((tmp_path / "stage2" / "policy.json").read_text())
    assert second["stage"] == 2 and second["train_samples"] < first["train_samples"]  # only accepted images
    assert second["match_accuracy"] > 0.85
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(AlignmentPolicy.from_pretrained(tmp_path / "stage2")(x, ["a", "b"]),
                                   policy(x, ["a", "b"]))


def test_stage_two_needs_a_selector_and_ratings_must_exist(tmp_path):
    images, ratings = matched_pool(tmp_path, count=12)
    with pytest.raises(SystemExit):
        train_policy.parse_args(["--images", images, "--ratings", ratings, "--stage", "2"])
    empty = RatingsFile(tmp_path / "empty.jsonl")
    empty.append(Rating(image=image_digest(np.zeros((16, 16), np.uint8)), prompt="x", rating=2, rater="dr-a"))
    with pytest.raises(ValueError, match="no prompt_match ratings"):
        train_policy.main(train_policy.parse_args([*TOWERS, *COMMON, "--images", images, "--ratings",
                                                   str(tmp_path / "empty.jsonl"), "--output_dir", str(tmp_path)]))


def test_a_cnn_classifier_serves_as_the_image_tower(tmp_path):
    """A saved transformers ResNet classifier (what train_expert.py writes) is read by its pooled features; the
    policy learns the match on it and loads back with the same predictions."""
    from transformers import ResNetConfig, ResNetForImageClassification

    ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                              layer_type="basic", num_labels=2)).save_pretrained(tmp_path / "expert")
    images, ratings = matched_pool(tmp_path)
    policy = train_policy.main(train_policy.parse_args([
        *TOWERS[2:], *COMMON, "--images", images, "--ratings", ratings, "--image_encoder_name_or_path",
        str(tmp_path / "expert"), "--max_train_steps", "120", "--output_dir", str(tmp_path / "policy")]))
    assert type(policy.image_encoder).__name__ == "ResNetModel" and policy.head[0].in_features == 16 + 32
    metrics = json.loads((tmp_path / "policy" / "policy.json").read_text())
    assert metrics["match_accuracy"] > 0.85 and metrics["spearman"] > 0.7
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        loaded = AlignmentPolicy.from_pretrained(tmp_path / "policy")
        torch.testing.assert_close(loaded(x, ["a", "b"]), policy(x, ["a", "b"]))

    rgb = tmp_path / "rgb"
    ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8], depths=[1],
                                              layer_type="basic")).save_pretrained(rgb)
    with pytest.raises(ValueError, match="takes 3-channel images; the rated images have 1"):
        train_policy.main(train_policy.parse_args([*COMMON, "--images", images, "--ratings", ratings,
                                                   "--image_encoder_name_or_path", str(rgb), "--output_dir",
                                                   str(tmp_path / "bad")]))


def test_open_clip_towers_serve_as_the_frozen_encoders(tmp_path):
    """A local open_clip folder (BiomedCLIP's format) gives both towers: they stay as loaded, only the head learns
    the match, and the saved policy carries the towers and loads back with the same predictions."""
    from .test_clip_metrics import save_tiny_clip

    save_tiny_clip(tmp_path / "clip")
    images, ratings = matched_pool(tmp_path)
    data = ["--images", images, "--ratings", ratings, "--clip_model", str(tmp_path / "clip")]
    policy = train_policy.main(train_policy.parse_args([*COMMON, *data, "--max_train_steps", "150",
                                                        "--output_dir", str(tmp_path / "policy")]))
    assert type(policy).__name__ == "ClipAlignmentPolicy" and policy.head[0].in_features == 2 * 16
    metrics = json.loads((tmp_path / "policy" / "policy.json").read_text())
    assert metrics["match_accuracy"] > 0.85 and metrics["spearman"] > 0.7
    fresh = ClipAlignmentPolicy(tmp_path / "clip")
    for name, weight in fresh.clip.state_dict().items():  # frozen: the towers are the folder's
        torch.testing.assert_close(policy.clip.state_dict()[name], weight, atol=0, rtol=0)
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        loaded = AlignmentPolicy.from_pretrained(tmp_path / "policy")
        assert isinstance(loaded, ClipAlignmentPolicy)
        torch.testing.assert_close(loaded(x, ["a bright scan", "a dark scan"]),
                                   policy(x, ["a bright scan", "a dark scan"]))
    # stage 2 continues the saved policy, towers included
    train_selector.main(train_selector.parse_args([*TOWERS[:-2], "--intermediate_size", "64", *COMMON, *data[:4],
                                                   "--max_train_steps", "30", "--output_dir", str(tmp_path / "sel")]))
    second = train_policy.main(train_policy.parse_args([
        *COMMON, *data[:4], "--stage", "2", "--selector", str(tmp_path / "sel"), "--policy_model_name_or_path",
        str(tmp_path / "policy"), "--max_train_steps", "5", "--output_dir", str(tmp_path / "stage2")]))
    assert isinstance(second, ClipAlignmentPolicy)
    assert (tmp_path / "stage2" / "clip" / "open_clip_config.json").is_file()
    with pytest.raises(SystemExit):
        train_policy.parse_args([*data, "--image_encoder_name_or_path", str(tmp_path / "x")])
