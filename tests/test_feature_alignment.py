"""The feature-alignment loss: its value, where its gradients go, the shortcut it no longer has, the noise-aware
expert's noise and weights, and the traps of the paper's reference code."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medsyn.metrics.features import PooledImageEncoder
from medsyn.training.expert_noise import ExpertNoise, NoiseAccuracy, NoiseProcess
from medsyn.training.feature_alignment import (
    AlignmentHead,
    BlockFeatures,
    FeatureAligner,
    FrozenExpert,
    alignment_loss,
    block_channels,
    resolve_block,
)

from .conftest import get_dummy_components


def tiny_expert(channels: int = 1, image_size: int | None = 24) -> FrozenExpert:
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=channels, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic")
    return FrozenExpert(PooledImageEncoder(ResNetModel(config), [0.5] * channels, [0.5] * channels), image_size)


def test_the_loss_is_zero_when_aligned_two_when_opposite_and_ignores_weight_zero_images():
    features = torch.randn(3, 4)
    head = nn.Identity()
    assert alignment_loss(2.5 * features, features, head).item() == pytest.approx(0.0, abs=1e-6)
    assert alignment_loss(-features, features, head).item() == pytest.approx(2.0, abs=1e-6)
    unet_features = torch.randn(3, 4, requires_grad=True)
    loss = alignment_loss(unet_features, features, head, weights=torch.tensor([1.0, 0.5, 0.0]))
    expected = (1 - F.cosine_similarity(unet_features, features, dim=1)) * torch.tensor([1.0, 0.5, 0.0])
    torch.testing.assert_close(loss, expected.mean())
    loss.backward()
    assert unet_features.grad[2].abs().max() == 0 and unet_features.grad[0].abs().max() > 0


def fit(unet_features: torch.Tensor | nn.Parameter, expert_features: torch.Tensor, steps: int = 600) -> float:
    """The alignment loss after fitting a fresh head (and ``unet_features`` when trainable) with Adam."""
    torch.manual_seed(0)
    head = AlignmentHead(unet_features.shape[1], expert_features.shape[1], hidden_dim=32)
    parameters = list(head.parameters()) + ([unet_features] if isinstance(unet_features, nn.Parameter) else [])
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = alignment_loss(unet_features.expand(len(expert_features), -1), expert_features, head)
        loss.backward()
        optimizer.step()
    return alignment_loss(unet_features.expand(len(expert_features), -1), expert_features, head).item()


def test_features_that_ignore_the_input_cannot_beat_the_spread_of_the_expert_features():
    """The shortcut of the paper's direction is gone: with a fixed target, the best constant prediction v has
    mean cosine |mean of the unit targets| (v along that mean), so a UNet whose features do not depend on the
    input is held to 1 - that norm, however head and features are trained."""
    generator = torch.Generator().manual_seed(1)
    expert_features = torch.randn(64, 8, generator=generator) + 0.8  # spread around a common direction
    units = F.normalize(expert_features, dim=1)
    bound = 1 - units.mean(0).norm().item()
    constant = nn.Parameter(torch.randn(1, 6))
    loss = fit(constant, expert_features)
    assert bound > 0.2
    assert loss >= bound - 1e-4  # cannot go below the closed-form floor ...
    assert loss == pytest.approx(bound, abs=0.01)  # ... and the optimiser did reach it
    informative = expert_features @ torch.randn(8, 6, generator=generator)  # features that carry the input
    assert fit(informative, expert_features) < bound / 4


def test_gradients_reach_unet_and_head_but_not_the_expert():
    unet = get_dummy_components()["unet"].train()
    expert = tiny_expert()
    block = BlockFeatures(unet, "down_blocks.-1")
    noisy = torch.randn(1, 1, 16, 16)  # batch size 1: nothing may squeeze it away
    unet(noisy, torch.full((1,), 0.5), class_labels=torch.zeros(1, dtype=torch.long))
    unet_features = block.pop()
    head = AlignmentHead(unet_features.shape[1], expert.feature_dim)
    loss = alignment_loss(unet_features, expert(noisy), head)
    loss.backward()
    assert 0 <= loss.item() <= 2
    assert all(p.grad is None for p in expert.parameters())
    assert head.mlp[0].weight.grad.abs().sum() > 0
    assert sum(p.grad.abs().sum() for p in unet.down_blocks[-1].parameters() if p.grad is not None) > 0


def test_the_expert_stays_in_eval_mode_through_train_calls():
    expert = tiny_expert()
    wrapper = nn.ModuleDict({"expert": expert, "head": AlignmentHead(8, 16)})
    wrapper.train()
    assert wrapper["head"].training
    assert not any(m.training for m in expert.modules())
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    before = [b.clone() for b in expert.buffers()]
    expert(images)  # BatchNorm running statistics must not move
    assert all(torch.equal(a, b) for a, b in zip(before, expert.buffers()))


def test_the_expert_sees_inputs_resized_to_its_resolution():
    expert = tiny_expert(image_size=32)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    resized = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(expert(images), tiny_expert(image_size=None)(resized))


def test_block_features_name_the_block_and_refuse_stale_features():
    unet = get_dummy_components()["unet"]
    sample = torch.randn(2, 1, 16, 16)
    kwargs = dict(timestep=torch.full((2,), 0.5), class_labels=torch.zeros(2, dtype=torch.long))
    assert block_channels(unet, "down_blocks.-1", sample, **kwargs) == unet.config.block_out_channels[-1]
    assert block_channels(unet, "mid_block", sample, **kwargs) == unet.config.block_out_channels[-1]
    assert resolve_block(unet, "down_blocks.0") is unet.down_blocks[0]
    with pytest.raises(ValueError, match="no 'middle_block'"):
        resolve_block(unet, "middle_block")
    block = BlockFeatures(unet, "mid_block")
    with pytest.raises(RuntimeError, match="has not run"):
        block.pop()


def test_ddpm_corruption_is_the_schedulers_add_noise_at_the_timesteps_sigma():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    noise = ExpertNoise.from_ddpm_scheduler(scheduler)
    images, z = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    timesteps = torch.tensor([0, 10, 50, 99])
    torch.testing.assert_close(noise.corrupt(images, noise.timestep_sigmas(timesteps), z),
                               scheduler.add_noise(images, z, timesteps), atol=1e-5, rtol=1e-5)
    assert torch.equal(noise.input_scale(torch.tensor([0.0, 30.0])), torch.ones(2))


def test_ve_inputs_keep_the_data_scale_at_every_noise_level():
    """c_in = sigma_data / sqrt(sigma_data^2 + sigma^2): data of std sigma_data stays at std sigma_data."""
    noise = ExpertNoise(NoiseProcess.VE, sigma_min=0.01, sigma_max=50.0)
    generator = torch.Generator().manual_seed(0)
    images = 0.5 * torch.randn(20000, 1, 1, 1, generator=generator)
    for sigma in (0.0, 1.0, 50.0):
        level = torch.full((len(images),), sigma)
        scaled = noise.corrupt(images, level, torch.randn(images.shape, generator=generator))
        scaled = scaled * noise.input_scale(level).reshape(-1, 1, 1, 1)
        assert scaled.std().item() == pytest.approx(0.5, rel=0.03)
    sigmas = noise.sample_sigmas(20000, generator)
    assert 0.01 <= sigmas.min() and sigmas.max() <= 50.0
    assert sigmas.log().mean().item() == pytest.approx((math.log(0.01) + math.log(50.0)) / 2, abs=0.05)


def test_a_noise_aware_expert_scales_its_input_as_it_was_trained():
    plain = tiny_expert(image_size=None)
    aware = FrozenExpert(plain.encoder, None, ExpertNoise(NoiseProcess.VE, sigma_min=0.01, sigma_max=20.0))
    images, sigma = torch.randn(2, 1, 16, 16) * 5, torch.tensor([0.0, 5.0])
    scale = torch.tensor([1.0, 0.5 / math.sqrt(0.25 + 25.0)]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(aware(images, sigma), plain(images * scale))


def test_accuracy_weights_follow_the_table_in_log_sigma():
    table = NoiseAccuracy(sigmas=[0.1, 1.0, 10.0], accuracies=[0.9, 0.6, 0.26], chance=0.25)
    sigma = torch.tensor([0.01, 0.1, math.sqrt(0.1), 1.0, 10.0, 100.0])
    weights = table.weights(sigma, min_margin=0.1)
    expected = torch.tensor([1.0, 1.0, 0.5 / 0.65, 0.35 / 0.65, 0.0, 0.0])
    torch.testing.assert_close(weights, expected)
    assert table.informative_range(0.1) == (0.1, 1.0)
    assert table.weights(sigma, min_margin=0.7).abs().sum() == 0  # no level clears the margin
    with pytest.raises(ValueError, match="ascending"):
        NoiseAccuracy(sigmas=[1.0, 0.1], accuracies=[0.5, 0.5], chance=0.5)


def test_an_expert_trained_on_another_noise_process_is_refused():
    unet = get_dummy_components()["unet"]
    ve = ExpertNoise(NoiseProcess.VE, sigma_min=0.01, sigma_max=20.0)
    ddpm = ExpertNoise(NoiseProcess.DDPM)
    expert = tiny_expert()
    expert.noise = ve
    with pytest.raises(ValueError, match="trained on ve noise.*--noise_augment ddpm"):
        FeatureAligner(expert, unet, "mid_block", 16, ddpm, resolution=24)
    expert.noise = ddpm
    with pytest.raises(ValueError, match="DDPM schedule"):
        FeatureAligner(expert, unet, "mid_block", 16, ExpertNoise(NoiseProcess.DDPM, beta_schedule="linear"), 24)
    with pytest.raises(ValueError, match="noise process 'vp'"):
        ExpertNoise("vp")
