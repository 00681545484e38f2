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
    scheduler = AnnealedLangevinScheduler(num_train_timesteps=4, sigma_max=3.0, sigma_min=0.05, step_size=1e-3, n_steps_each=2)
    class_names = ["healthy", "tumor"] if num_classes == 2 else None
    return {"unet": unet, "scheduler": scheduler, "class_names": class_names}


def get_dummy_pipeline(**kwargs) -> ScoreLangevinPipeline:
    pipe = ScoreLangevinPipeline(**get_dummy_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe() -> ScoreLangevinPipeline:
    return get_dummy_pipeline()
