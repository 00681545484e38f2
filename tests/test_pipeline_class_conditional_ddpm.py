"""ClassConditionalDDPMPipeline: the pipeline contract, and exact sampling of a Gaussian with diffusers' schedulers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    ConfigMixin,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    ModelMixin,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from medsyn import ClassConditionalDDPMPipeline, ddpm_unet_config

from .pipeline_test_mixin import MedsynPipelineTesterMixin


def get_dummy_components(in_channels: int = 1) -> dict:
    torch.manual_seed(0)
    unet = UNet2DModel(**ddpm_unet_config(sample_size=16, in_channels=in_channels, num_classes=2, base_channels=8,
                                          channel_mult=(1, 2), layers_per_block=1, norm_num_groups=4))
    scheduler = DPMSolverMultistepScheduler.from_config(DDPMScheduler(num_train_timesteps=1000).config)
    return {"unet": unet.eval(), "scheduler": scheduler, "class_names": ["healthy", "tumor"]}


class TestClassConditionalDDPMPipelineContract(MedsynPipelineTesterMixin):
    pipeline_class = ClassConditionalDDPMPipeline

    def get_dummy_components(self):
        return get_dummy_components()

    def get_dummy_inputs(self, seed=0, batch=1):
        return {"class_labels": [(seed + i) % 2 for i in range(batch)], "guidance_scale": 2.0, "output_type": "np",
                "num_inference_steps": 4,
                "generator": [torch.Generator().manual_seed(seed + i) for i in range(batch)]}


class GaussianNoisePredictor(ModelMixin, ConfigMixin):
    """The exact epsilon (or v) of data N(mean_c, std^2) per pixel, class c, under a DDPM schedule: with
    x_t = sqrt(a) x_0 + sqrt(1 - a) eps, E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mean) / (a std^2 + 1 - a).
    The null class (index len(means)) is the equal mixture's nearest Gaussian: mean 0, same std plus the spread."""

    @register_to_config
    def __init__(self, sample_size: int = 4, in_channels: int = 1, num_class_embeds: int = 3,
                 means: tuple[float, ...] = (-0.2, 0.2), std: float = 0.25, num_train_timesteps: int = 1000,
                 prediction_type: str = "epsilon"):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.alphas_cumprod = DDPMScheduler(num_train_timesteps=num_train_timesteps).alphas_cumprod

    def forward(self, sample, timestep, class_labels=None):
        a = self.alphas_cumprod[torch.as_tensor(timestep).long().cpu()].to(sample.dtype)
        means = torch.tensor([*self.config.means, 0.0], dtype=sample.dtype)[class_labels.cpu()].view(-1, 1, 1, 1)
        variance = torch.full_like(means, self.config.std**2)
        variance[class_labels.cpu() == len(self.config.means)] += float(np.var(self.config.means))
        eps = (1 - a).sqrt() * (sample - a.sqrt() * means) / (a * variance + 1 - a)
        if self.config.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x_0
            x0 = (sample - (1 - a).sqrt() * eps) / a.sqrt()
            eps = a.sqrt() * eps - (1 - a).sqrt() * x0
        return BaseOutput(sample=eps + 0 * self.anchor)


def gaussian_pipeline(scheduler_class, prediction_type="epsilon", **config):
    network = GaussianNoisePredictor(prediction_type=prediction_type)
    training = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    pipe = ClassConditionalDDPMPipeline(network, scheduler_class.from_config(training.config, **config),
                                        class_names=["a", "b"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampled_std(pipe, steps: int, label: int = 1, n: int = 1000) -> float:
    images = pipe(batch_size=n, class_labels=label, num_inference_steps=steps, output_type="pt",
                  generator=torch.Generator().manual_seed(label)).images
    return (images * 2 - 1).std().item()


# 16,000 pixels per class: the sampled std's own error is about 0.6%.
@pytest.mark.parametrize(("scheduler_class", "steps", "prediction_type"), [
    (DDIMScheduler, 500, "epsilon"),  # first order
    (DPMSolverMultistepScheduler, 100, "epsilon"),
    (DPMSolverMultistepScheduler, 100, "v_prediction"),
    (UniPCMultistepScheduler, 100, "epsilon"),
])
def test_deterministic_solvers_reproduce_each_class_gaussian(scheduler_class, steps, prediction_type):
    pipe = gaussian_pipeline(scheduler_class, prediction_type)
    network = pipe.unet
    for label, mean in enumerate(network.config.means):
        images = pipe(batch_size=1000, class_labels=label, num_inference_steps=steps, output_type="pt",
                      generator=torch.Generator().manual_seed(label)).images
        pixels = (images * 2 - 1).flatten().double()
        assert pixels.mean().item() == pytest.approx(mean, abs=0.02 * network.config.std)
        assert pixels.std().item() == pytest.approx(network.config.std, rel=0.02)
    assert pipe.num_timesteps == steps


def test_dpm_solver_error_shrinks_with_steps():
    """Data this narrow (std 0.25 on a 1,000-step linear schedule) is hard at few steps: DPM-Solver++ 2M is 42% low
    at 10 steps, about 3% at 50 and within sampling error at 100."""
    pipe = gaussian_pipeline(DPMSolverMultistepScheduler)
    errors = [abs(sampled_std(pipe, steps, n=300) / 0.25 - 1) for steps in (10, 25, 50, 100)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.3 and errors[-1] < 0.02


def test_ancestral_ddpm_sampling_matches_within_sampling_error():
    pipe = gaussian_pipeline(DDPMScheduler)
    assert sampled_std(pipe, 1000) == pytest.approx(0.25, rel=0.03)


def test_guidance_combines_the_two_predictions_linearly():
    """With w, the guided epsilon is u + w (c - u): for Gaussians the sample mean moves along (mean_c - mean_null)."""
    pipe = gaussian_pipeline(DDIMScheduler)
    means = {}
    for w in (0.0, 1.0, 1.5):
        images = pipe(batch_size=500, class_labels="b", guidance_scale=w, num_inference_steps=30, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
        means[w] = (images * 2 - 1).mean().item()
    assert means[0.0] == pytest.approx(0.0, abs=0.015)  # w = 0: the null class alone
    assert means[1.0] == pytest.approx(0.2, abs=0.01)
    assert means[1.5] > means[1.0] + 0.05  # beyond the class: what guidance > 1 is for


def test_bad_arguments_are_named():
    pipe = ClassConditionalDDPMPipeline(**get_dummy_components())
    with pytest.raises(ValueError, match="num_inference_steps 2000 exceeds the 1000 training timesteps"):
        pipe(num_inference_steps=2000)
    with pytest.raises(ValueError, match="unknown class label 'glioma'"):
        pipe(class_labels="glioma", num_inference_steps=2)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(guidance_scale=float("nan"), num_inference_steps=2)
    with pytest.raises(ValueError, match="latents have shape"):
        pipe(latents=torch.zeros(1, 1, 8, 8), num_inference_steps=2)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_loads_without_medsyn_code_from_its_folder(tmp_path, in_channels):
    from diffusers import DiffusionPipeline

    pipe = ClassConditionalDDPMPipeline(**get_dummy_components(in_channels))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "pipeline_class_conditional_ddpm.py").is_file()
    stock = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(stock).__module__.startswith("diffusers_modules")
    stock.set_progress_bar_config(disable=True)
    ours = ClassConditionalDDPMPipeline.from_pretrained(tmp_path)
    ours.set_progress_bar_config(disable=True)
    inputs = lambda: dict(class_labels=["tumor", "healthy"], guidance_scale=3.0, num_inference_steps=5,  # noqa: E731
                          generator=torch.Generator().manual_seed(1), output_type="np")
    assert np.array_equal(stock(**inputs()).images, ours(**inputs()).images)
    assert ours(**inputs()).images.shape == (2, 16, 16, in_channels)
