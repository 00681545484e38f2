"""The flags diffusers' training scripts have, doing what they do there: min-SNR weighting against its closed form,
offset noise, gradient checkpointing, 8-bit Adam, centre vs random crop, --validation_epochs, --variant; and a clear
refusal where a flag does not apply to the score model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from medsyn.data import image_transform
from medsyn.train_scripts import train_medisyn, train_score_langevin
from medsyn.training.denoising_loss import denoising_loss, min_snr_weights, offset_noise

from .conftest import get_dummy_pipeline
from .test_train_medisyn import TINY_MODEL, TINY_RUN
from .test_train_score_langevin import TINY


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_closed_form(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    timesteps = torch.tensor([0, 10, 100, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr if prediction_type == "epsilon" else
                                                                           snr + 1)
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps, 5.0).double(), expected, rtol=1e-5, atol=0)
    assert expected[0] < 1 and expected[-1] == pytest.approx(1 if prediction_type == "epsilon" else snr[-1] / (snr[-1] + 1))


def test_weighted_loss_is_the_weighted_mean_of_per_image_errors():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    prediction, target = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    timesteps = torch.tensor([1, 50, 400, 900])
    per_image = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    weights = min_snr_weights(scheduler, timesteps, 5.0)
    torch.testing.assert_close(denoising_loss(prediction, target, timesteps, scheduler, 5.0), (per_image * weights).mean())
    torch.testing.assert_close(denoising_loss(prediction, target, timesteps, scheduler), F.mse_loss(prediction, target))
    huge = denoising_loss(prediction, target, timesteps, scheduler, 1e12)  # gamma above every SNR: plain MSE
    torch.testing.assert_close(huge, F.mse_loss(prediction, target))


def test_offset_noise_is_a_per_channel_constant_of_the_given_scale():
    noise = torch.zeros(2000, 3, 4, 4)
    shifted = offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(shifted, shifted[:, :, :1, :1].expand_as(shifted))
    assert shifted[:, :, 0, 0].std().item() == pytest.approx(0.1, rel=0.05)


def test_score_model_refuses_ddpm_only_flags_with_the_reason(capsys):
    for flag in ("--snr_gamma", "--noise_offset"):
        with pytest.raises(SystemExit):
            train_score_langevin.parse_args(TINY + [flag, "5"])
        assert f"{flag} does not apply here" in capsys.readouterr().err


def run_score(tmp_path, name, *extra):
    args = train_score_langevin.parse_args(TINY + ["--output_dir", str(tmp_path / name), "--checkpointing_steps", "100",
                                                   *extra])
    return train_score_langevin.main(args)


def test_gradient_checkpointing_trains_the_same_weights(tmp_path):
    plain = run_score(tmp_path, "plain", "--max_train_steps", "2", "--validation_steps", "100")
    checkpointed = run_score(tmp_path, "ckpt", "--max_train_steps", "2", "--validation_steps", "100",
                             "--gradient_checkpointing")
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    for (key, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=key)


def test_8bit_adam_without_bitsandbytes_says_what_to_install(tmp_path):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install bitsandbytes"):
            run_score(tmp_path, "adam8", "--max_train_steps", "1", "--use_8bit_adam")
    else:
        pytest.skip("bitsandbytes is installed here")


def test_validation_epochs_adds_images_at_epoch_ends(tmp_path):
    # 24 images in batches of 4: 6 optimiser steps per epoch
    run_score(tmp_path, "epochs", "--max_train_steps", "13", "--validation_steps", "100", "--validation_epochs", "1")
    assert sorted(p.name for p in (tmp_path / "epochs" / "validation").iterdir()) == [
        "step-000006.png", "step-000012.png"]


def test_center_crop_or_a_random_crop_as_in_diffusers():
    wide = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (16, 1)))  # 16 x 32, brighter to the right
    centre = image_transform(16, center_crop=True)(wide)
    assert centre.shape == (1, 16, 16)
    torch.testing.assert_close(centre, image_transform(16, center_crop=True)(wide))
    torch.manual_seed(0)
    crops = {tuple(image_transform(16, center_crop=False)(wide)[0, 0, :1].tolist()) for _ in range(20)}
    assert len(crops) > 1  # different squares
    square = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    torch.testing.assert_close(image_transform(16, center_crop=False)(square), image_transform(16)(square))
    assert train_score_langevin.parse_args(TINY).center_crop is False


def test_variant_and_revision_reach_from_pretrained(tmp_path):
    get_dummy_pipeline().save_pretrained(tmp_path / "base", variant="fp16")
    with pytest.raises((OSError, ValueError)):
        run_score(tmp_path, "no-variant", "--max_train_steps", "1", "--pretrained_model_name_or_path",
                  str(tmp_path / "base"), "--class_conditional")
    model = run_score(tmp_path, "variant", "--max_train_steps", "1", "--pretrained_model_name_or_path",
                      str(tmp_path / "base"), "--variant", "fp16", "--class_conditional", "--validation_steps", "100")
    assert model.config.sample_size == 16


def test_medisyn_trains_with_min_snr_and_offset_noise(vae_path, tmp_path):
    def run(name, *extra):
        return train_medisyn.main(train_medisyn.parse_args([*TINY_MODEL, *TINY_RUN, "--vae_model_name_or_path",
                                                            vae_path, "--max_train_steps", "2", "--output_dir",
                                                            str(tmp_path / name), *extra]))

    plain, weighted = run("plain"), run("weighted", "--snr_gamma", "5", "--noise_offset", "0.1",
                                        "--gradient_checkpointing")
    difference = max((a - b).abs().max().item() for a, b in zip(plain.unet.parameters(), weighted.unet.parameters()))
    assert difference > 0
