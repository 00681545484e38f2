"""The expert classifier script on CPU: trains, reports, reloads as a frozen expert, resumes, fine-tunes RGB weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

from medsyn.train_scripts.train_expert import main, parse_args
from medsyn.training.feature_alignment import FrozenExpert

from .conftest import assert_same_weights

TINY = [
    "--resolution", "32", "--embedding_size", "8", "--hidden_sizes", "8", "16", "--depths", "1", "1",
    "--layer_type", "basic", "--simulated_num_images", "60", "--train_batch_size", "8", "--report_to", "none",
    "--seed", "2", "--validation_steps", "100", "--checkpointing_steps", "100", "--learning_rate", "1e-3",
]


def run(tmp_path, name, *extra):
    return main(parse_args([*TINY, "--output_dir", str(tmp_path / name), *extra]))


def test_trains_reports_and_loads_as_a_frozen_expert(tmp_path):
    model = run(tmp_path, "expert", "--max_train_steps", "4", "--augment")
    out = tmp_path / "expert"
    report = json.loads((out / "validation.json").read_text())
    matrix = np.array(report["confusion_matrix"])
    assert report["class_names"] == ["healthy", "tumor"] and matrix.sum() == 6  # 10% of 60 held out
    assert report["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    card = (out / "README.md").read_text()
    assert "$" not in card and "| true \\ predicted | healthy | tumor |" in card
    expert = FrozenExpert.from_pretrained(str(out))
    assert expert.image_size == 32 and expert.feature_dim == 16
    loaded = ResNetForImageClassification.from_pretrained(out)
    assert_same_weights(loaded, model)
    features = expert(torch.rand(1, 1, 20, 20) * 2 - 1)  # any size in, resized to 32; batch size 1
    assert features.shape == (1, 16)


def test_a_nan_loss_stops_training_before_anything_is_saved(tmp_path, monkeypatch):
    from medsyn.train_scripts import train_expert

    nan_loss = lambda logits, labels: logits.sum() * float("nan")  # noqa: E731
    monkeypatch.setattr(train_expert.F, "cross_entropy", nan_loss)
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        run(tmp_path, "expert", "--max_train_steps", "2")
    assert not (tmp_path / "expert" / "model.safetensors").exists()


def test_resume_ends_with_the_same_weights(tmp_path):
    extra = ["--checkpointing_steps", "3", "--augment"]
    straight = run(tmp_path, "straight", *extra, "--max_train_steps", "6")
    run(tmp_path, "resumed", *extra, "--max_train_steps", "3")
    resumed = run(tmp_path, "resumed", *extra, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert_same_weights(resumed, straight)


def test_fine_tunes_rgb_weights_on_grayscale_scans(tmp_path):
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=1000)
    ResNetForImageClassification(config).save_pretrained(tmp_path / "imagenet")
    ConvNextImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(
        tmp_path / "imagenet")
    model = run(tmp_path, "tuned", "--pretrained_model_name_or_path", str(tmp_path / "imagenet"),
                "--max_train_steps", "2")
    assert model.config.num_channels == 3 and model.config.num_labels == 2
    assert model.config.id2label == {0: "healthy", 1: "tumor"}
    expert = FrozenExpert.from_pretrained(str(tmp_path / "tuned"))
    assert expert.encoder.std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
    assert expert(torch.zeros(2, 1, 32, 32)).shape == (2, 16)  # grayscale repeated to the weights' 3 channels


def test_bad_arguments_fail_clearly():
    with pytest.raises(SystemExit):
        parse_args(["--hidden_sizes", "8", "16", "--depths", "1"])
    with pytest.raises(SystemExit):
        parse_args(["--validation_fraction", "0"])


def test_noise_augmented_expert_reports_and_saves_its_accuracy_per_noise_level(tmp_path):
    run(tmp_path, "aware", "--max_train_steps", "3", "--noise_augment", "ve", "--noise_eval_levels", "4")
    out = tmp_path / "aware"
    report = json.loads((out / "validation.json").read_text())["noise_accuracy"]
    sigmas = report["sigmas"]
    assert report["process"]["process"] == "ve" and report["process"]["sigma_min"] == 0.01
    assert len(sigmas) == 4 and sigmas[0] == pytest.approx(0.01) and sigmas == sorted(sigmas)
    assert sigmas[-1] == pytest.approx(report["process"]["sigma_max"])  # from the data: technique 1
    assert all(a * 6 == pytest.approx(round(a * 6)) for a in report["accuracies"])  # fractions of 6 images
    class_counts = np.array(json.loads((out / "validation.json").read_text())["confusion_matrix"]).sum(1)
    assert report["chance"] == pytest.approx(class_counts.max() / class_counts.sum())  # the majority class
    expert = FrozenExpert.from_pretrained(str(out))
    assert expert.noise.process == "ve" and expert.noise.sigma_max == pytest.approx(sigmas[-1])
    assert expert.accuracy.accuracies == report["accuracies"]
    card = (out / "README.md").read_text()
    assert "Trained on ve noise" in card and "| sigma (VE-equivalent) | accuracy |" in card


def test_ddpm_noise_table_has_alpha_bar_and_clean_experts_say_so(tmp_path):
    run(tmp_path, "ddpm", "--max_train_steps", "2", "--noise_augment", "ddpm", "--num_train_timesteps", "50",
        "--noise_eval_levels", "3")
    expert = FrozenExpert.from_pretrained(str(tmp_path / "ddpm"))
    assert expert.noise.process == "ddpm" and expert.noise.num_train_timesteps == 50
    assert "| sigma (VE-equivalent) | alpha-bar | accuracy |" in (tmp_path / "ddpm" / "README.md").read_text()
    run(tmp_path, "clean", "--max_train_steps", "1")
    assert FrozenExpert.from_pretrained(str(tmp_path / "clean")).noise is None
    assert "Trained on clean images only" in (tmp_path / "clean" / "README.md").read_text()
