"""Stage 1 on CPU: the autoencoder script's losses, scaling factor, save/reload and resume on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from medsyn.metrics.features import PooledImageEncoder
from medsyn.train_scripts.train_autoencoder import main, parse_args
from medsyn.training.autoencoder_losses import FeaturePerceptualLoss, adversarial_weight

from .conftest import assert_same_weights
from .ddp_launch import run_two_ranks

TINY = [
    "--resolution", "16", "--block_out_channels", "8", "16", "--layers_per_block", "1", "--norm_num_groups", "4",
    "--simulated_num_images", "30", "--train_batch_size", "4", "--discriminator_channels", "8",
    "--discriminator_layers", "2", "--num_validation_images", "2", "--report_to", "none", "--seed", "3",
    "--validation_steps", "100", "--checkpointing_steps", "100",
]


def run(tmp_path, name, *extra):
    return main(parse_args(TINY + ["--output_dir", str(tmp_path / name), *extra]))


def tiny_resnet(tmp_path) -> str:
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ResNetModel(config).save_pretrained(tmp_path / "resnet")
    return str(tmp_path / "resnet")


def test_trains_saves_and_measures_the_latent_scale(tmp_path):
    model = run(tmp_path, "vae", "--max_train_steps", "4", "--adversarial_warmup_steps", "2", "--learning_rate", "1e-3",
                "--perceptual_network", tiny_resnet(tmp_path))
    out = tmp_path / "vae"
    loaded = AutoencoderKL.from_pretrained(out)
    assert_same_weights(loaded, model)
    # The saved factor makes the training latents unit-variance: check with fresh posterior samples.
    from medsyn.data import image_transform, simulated_dataset

    dataset = simulated_dataset(30, resolution=16, seed=3)
    images = torch.stack([image_transform(16)(row["image"]) for row in dataset])
    with torch.no_grad():
        latents = loaded.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(99))
    assert (latents * loaded.config.scaling_factor).std().item() == pytest.approx(1.0, abs=0.05)
    card = (out / "README.md").read_text()
    assert "$" not in card and f"{loaded.config.scaling_factor:.5g}" in card and "weight 0.001 on" in card
    assert np.asarray(Image.open(out / "reconstructions.png")).shape == (32, 32)


def test_resume_across_the_adversarial_warm_up_ends_with_the_same_weights(tmp_path):
    extra = ["--adversarial_warmup_steps", "2", "--learning_rate", "1e-3", "--gradient_accumulation_steps", "2",
             "--checkpointing_steps", "3"]
    straight = run(tmp_path, "straight", *extra, "--max_train_steps", "5")
    run(tmp_path, "resumed", *extra, "--max_train_steps", "3")
    resumed = run(tmp_path, "resumed", *extra, "--max_train_steps", "5", "--resume_from_checkpoint", "latest")
    assert_same_weights(resumed, straight)


def test_fine_tunes_an_rgb_autoencoder_from_a_pipeline_folder(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("normal", "cataract"):
        (tmp_path / "fundus" / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "fundus" / name / f"{i}.png")
    run(tmp_path, "rgb", "--train_data_dir", str(tmp_path / "fundus"), "--max_train_steps", "2",
        "--adversarial_weight", "0")
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "rgb").rename(tmp_path / "pipeline" / "vae")
    base = AutoencoderKL.from_pretrained(tmp_path / "pipeline", subfolder="vae")
    tuned = run(tmp_path, "tuned", "--train_data_dir", str(tmp_path / "fundus"), "--max_train_steps", "2",
                "--pretrained_model_name_or_path", str(tmp_path / "pipeline"), "--subfolder", "vae")
    assert tuned.config.in_channels == 3
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in tuned.state_dict().items())
    with pytest.raises(ValueError, match="the data has 1 channels but the autoencoder expects 3"):
        run(tmp_path, "mismatch", "--max_train_steps", "1", "--pretrained_model_name_or_path",
            str(tmp_path / "pipeline"), "--subfolder", "vae")


def test_perceptual_loss_is_a_distance_with_gradient_only_to_the_images(tmp_path):
    loss = FeaturePerceptualLoss(PooledImageEncoder.from_pretrained(tiny_resnet(tmp_path)))
    loss.train()
    assert not loss.encoder.training
    target = torch.rand(2, 1, 16, 16) * 2 - 1
    assert loss(target, target).item() == pytest.approx(0.0, abs=1e-9)
    reconstruction = (target + 0.3 * torch.randn_like(target)).requires_grad_()
    value = loss(reconstruction, target)
    value.backward()
    assert value.item() > 0 and reconstruction.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.encoder.parameters())


def test_adversarial_weight_waits_for_the_warm_up():
    assert [adversarial_weight(s, 0.01, 3) for s in range(5)] == [0, 0, 0, 0.01, 0.01]


def test_bad_arguments_fail_clearly():
    with pytest.raises(SystemExit):
        parse_args(["--perceptual_weight", "0.1"])  # no feature network to compute it on
    with pytest.raises(SystemExit):
        parse_args(["--resolution", "18", "--block_out_channels", "8", "16", "32"])
    with pytest.raises(SystemExit):
        parse_args(["--validation_fraction", "1.5"])


@pytest.mark.slow
def test_two_process_ddp_with_the_discriminator_keeps_ranks_identical(tmp_path):
    out = tmp_path / "ddp"
    ranks = run_two_ranks(tmp_path, "medsyn.train_scripts.train_autoencoder", [
        *TINY, "--max_train_steps", "4", "--adversarial_warmup_steps", "1", "--checkpointing_steps", "2",
        "--output_dir", str(out)])
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert "| optimiser steps, batch size | 4, 4 (x1 accumulation, 2 processes)" in (out / "README.md").read_text()
