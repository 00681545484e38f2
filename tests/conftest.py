"""Tiny components built from configs, as diffusers' fast tests do: a few channels, 16 px, few levels."""

from __future__ import annotations

import pytest
import torch

from medsyn.models.score_unet import build_score_unet
from medsyn.pipelines import ScoreLangevinPipeline
from medsyn.schedulers import AnnealedLangevinScheduler


def get_dummy_components(in_channels: int = 1, num_classes: int | None = 2) -> dict:
    torch.manual_seed(0)
    unet = build_score_unet(
        sample_size=16,
        in_channels=in_channels,
        num_classes=num_classes,
        base_channels=8,
        channel_mult=(1, 2),
        layers_per_block=1,
        norm_num_groups=4,
    ).eval()
    scheduler = AnnealedLangevinScheduler(
        num_train_timesteps=4, sigma_max=3.0, sigma_min=0.05, step_size=1e-3, n_steps_each=2
    )
    class_names = ["healthy", "tumor"] if num_classes == 2 else None
    return {"unet": unet, "scheduler": scheduler, "class_names": class_names}


def get_dummy_pipeline(**kwargs) -> ScoreLangevinPipeline:
    pipe = ScoreLangevinPipeline(**get_dummy_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe() -> ScoreLangevinPipeline:
    return get_dummy_pipeline()


DUMMY_CAPTIONS = [
    "axial T1 brain MRI, healthy",
    "axial T1 contrast-enhanced brain MRI, large left frontal glioma with oedema",
    "fundus photograph with diabetic retinopathy",
    "fundus photograph of a normal retina",
]


def get_dummy_medisyn_components(in_channels: int = 1) -> dict:
    """A 16 px MediSyn model: 2-level autoencoder (factor 2), 2-level conditional unet, 2-layer BERT."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import BertModel

    from medsyn.models.latent_diffusion import (
        autoencoder_config,
        bert_text_encoder_config,
        build_wordpiece_tokenizer,
        conditional_unet_config,
    )

    tokenizer = build_wordpiece_tokenizer(DUMMY_CAPTIONS, vocab_size=200, max_length=16, min_frequency=1)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        **autoencoder_config(
            in_channels,
            latent_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=16,
        )
    )
    text_encoder = BertModel(
        bert_text_encoder_config(
            max_length=16,
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
        )
    )
    unet = UNet2DConditionModel(
        **conditional_unet_config(
            sample_size=8,
            latent_channels=4,
            cross_attention_dim=32,
            block_out_channels=(8, 16),
            layers_per_block=1,
            attention_head_dim=4,
            norm_num_groups=4,
        )
    )
    scheduler = DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", clip_sample=False)
    return {
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "unet": unet.eval(),
        "scheduler": scheduler,
    }


def get_dummy_medisyn_pipeline(**kwargs):
    from medsyn.pipelines import MediSynPipeline

    pipe = MediSynPipeline(**get_dummy_medisyn_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory) -> str:
    """A tiny untrained 1-channel AutoencoderKL (factor 2) saved to a folder, as stage 2's scripts take it."""
    from diffusers import AutoencoderKL

    from medsyn.models.latent_diffusion import autoencoder_config

    path = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    config = autoencoder_config(1, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                norm_num_groups=4, sample_size=16)
    AutoencoderKL(**config).save_pretrained(path)
    return str(path)


def assert_same_weights(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    """Every tensor of ``expected``'s state dict equals ``actual``'s exactly (a resumed or reloaded model)."""
    actual_state = actual.state_dict()
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(
            actual_state[key], value, rtol=0, atol=0, msg=lambda message, key=key: f"{key}: {message}"
        )
