"""The feature-alignment loss: its value, where its gradients go, and the traps of the paper's reference code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsyn.metrics.features import PooledImageEncoder
from medsyn.training.feature_alignment import (
    BlockFeatures,
    ExpertProjection,
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


def test_cosine_of_identical_directions_is_minus_one_and_of_opposite_ones_plus_one():
    projection = ExpertProjection(expert_dim=4, unet_dim=4)
    with torch.no_grad():
        projection.linear.weight.copy_(torch.eye(4))
        projection.linear.bias.zero_()
    features = torch.randn(3, 4)
    assert alignment_loss(2.5 * features, features, projection).item() == pytest.approx(-1.0, abs=1e-6)
    assert alignment_loss(-features, features, projection).item() == pytest.approx(1.0, abs=1e-6)


def test_gradients_reach_unet_and_projection_but_not_the_expert():
    unet = get_dummy_components()["unet"].train()
    expert = tiny_expert()
    block = BlockFeatures(unet, "down_blocks.-1")
    noisy = torch.randn(1, 1, 16, 16)  # batch size 1: nothing may squeeze it away
    unet(noisy, torch.full((1,), 0.5), class_labels=torch.zeros(1, dtype=torch.long))
    unet_features = block.pop()
    projection = ExpertProjection(expert.feature_dim, unet_features.shape[1])
    loss = alignment_loss(unet_features, expert(noisy), projection)
    loss.backward()
    assert -1 <= loss.item() <= 1
    assert all(p.grad is None for p in expert.parameters())
    assert projection.linear.weight.grad.abs().sum() > 0
    assert sum(p.grad.abs().sum() for p in unet.down_blocks[-1].parameters() if p.grad is not None) > 0


def test_the_expert_stays_in_eval_mode_through_train_calls():
    expert = tiny_expert()
    wrapper = nn.ModuleDict({"expert": expert, "projection": ExpertProjection(16, 8)})
    wrapper.train()
    assert wrapper["projection"].training
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
