"""EDM preconditioning is exact: Gaussian data's closed-form denoiser, read through a UNet2DModel-style network, is
the closed-form D at every sigma, and the loss at that denoiser is the closed-form value."""

import json

import pytest
import torch
from diffusers import UNet2DModel
from torch import nn

from medsyn.models.preconditioning import (
    CONFIG_KEY,
    EDMPreconditioning,
    Preconditioning,
    edm_preconditioning,
    network_denoised,
    network_score,
    set_preconditioning,
)
from medsyn.training.score_losses import EDMLoss

MEAN, SD = 0.3, 0.45  # Gaussian data N(MEAN, SD^2) per value
SIGMAS = [0.002, 0.05, 0.3, 1.0, 7.0, 80.0]


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for x0 ~ N(MEAN, SD^2), x = x0 + sigma z."""
    sigma = sigma.view(-1, *[1] * (x.ndim - 1))
    return (SD**2 * x + sigma**2 * MEAN) / (SD**2 + sigma**2)


class GaussianF(nn.Module):
    """F* = (D* - c_skip x) / c_out as a network with UNet2DModel's Fourier convention: it sees c_in x and t, embeds
    log(t), and divides its output by t. It recovers sigma from log(t) = c_noise = ln(sigma) / 4."""

    def __init__(self, edm: EDMPreconditioning):
        super().__init__()
        self.edm = edm
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a dtype
        self.config = {}

    def forward(self, scaled, t, class_labels=None):
        sigma = (4 * t.double().log()).exp()
        c_skip, c_out, c_in, _ = (c.view(-1, 1, 1, 1) for c in self.edm.coefficients(sigma))
        x = scaled.double() / c_in
        raw = (gaussian_denoiser(x, sigma) - c_skip * x) / c_out
        return type("Out", (), {"sample": (raw / t.double().view(-1, 1, 1, 1)).float()})


@pytest.mark.parametrize("sigma_data", [SD, 0.5])
def test_the_exact_gaussian_denoiser_in_preconditioned_form_gives_the_closed_form_d_at_every_sigma(sigma_data):
    edm = EDMPreconditioning(sigma_data)
    net = GaussianF(edm)
    net.config = {CONFIG_KEY: {"type": "edm", "sigma_data": sigma_data}}
    generator = torch.Generator().manual_seed(0)
    for sigma in SIGMAS:
        x = MEAN + (SD**2 + sigma**2) ** 0.5 * torch.randn(3, 1, 8, 8, generator=generator)
        levels = torch.full((3,), sigma)
        expected = gaussian_denoiser(x.double(), levels.double())
        denoised = network_denoised(net, x, levels, edm)
        assert torch.allclose(denoised.double(), expected, rtol=1e-5, atol=1e-5 * max(1.0, sigma)), sigma
        score = network_score(net, x, sigma)
        assert torch.allclose(score.double(), (expected - x.double()) / sigma**2, rtol=1e-4,
                              atol=1e-4 / min(sigma, 1.0)), sigma


def test_the_edm_loss_at_the_exact_denoiser_is_half_a_value_at_every_sigma():
    """With sigma_data equal to the data's sd, lambda(sigma) times the posterior variance is 1: the optimal loss is
    d/2 per image at every level, so no level dominates training."""
    edm = EDMPreconditioning(SD)
    net = GaussianF(edm)
    loss = EDMLoss(edm)
    generator = torch.Generator().manual_seed(1)
    clean = MEAN + SD * torch.randn(4000, 1, 4, 4, generator=generator)
    terms = loss(net, clean, None, generator)
    per_value = terms.loss / 16
    assert per_value.mean().item() == pytest.approx(0.5, rel=0.03)
    low, high = terms.sigma < terms.sigma.median(), terms.sigma >= terms.sigma.median()
    assert per_value[low].mean().item() == pytest.approx(0.5, rel=0.05)
    assert per_value[high].mean().item() == pytest.approx(0.5, rel=0.05)
    assert terms.sigma.log().mean().item() == pytest.approx(-1.2, abs=0.06)
    assert terms.sigma.log().std().item() == pytest.approx(1.2, rel=0.04)


def tiny_unet() -> UNet2DModel:
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       time_embedding_type="fourier", layers_per_block=1)


def test_a_real_unet_embeds_c_noise_and_its_division_by_t_is_undone(tmp_path):
    """diffusers' Fourier UNet takes log(t) itself and divides by t: it must see log(t) = ln(sigma) / 4, the input
    c_in x, and give D = c_skip x + c_out F exactly as F read with the division undone."""
    torch.manual_seed(0)
    unet = tiny_unet().eval()
    set_preconditioning(unet, "edm", 0.5)
    edm = edm_preconditioning(unet)
    seen = {}
    unet.time_proj.register_forward_pre_hook(lambda module, args: seen.setdefault("t", args[0].clone()))
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 20.0])
    with torch.no_grad():
        denoised = network_denoised(unet, x, sigma, edm)
        c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in edm.coefficients(sigma))
        raw = unet(c_in * x, c_noise.flatten().exp()).sample * c_noise.exp()  # F with UNet2DModel's 1/t undone
    assert torch.allclose(seen["t"].log(), sigma.log() / 4, atol=1e-6)
    assert torch.allclose(denoised, c_skip * x + c_out * raw, atol=1e-6)

    unet.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY] == {"type": "edm", "sigma_data": 0.5}
    assert edm_preconditioning(UNet2DModel.from_pretrained(tmp_path)) == EDMPreconditioning(0.5)


def test_a_unet_saved_without_the_key_is_read_as_ncsn():
    torch.manual_seed(0)
    unet = tiny_unet().eval()
    assert edm_preconditioning(unet) is None
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        assert torch.equal(network_score(unet, x, sigma), unet(x, sigma).sample)
    set_preconditioning(unet, Preconditioning.NCSN)
    assert edm_preconditioning(unet) is None


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bad_sigma_data_is_named(bad):
    with pytest.raises(ValueError, match="sigma_data"):
        set_preconditioning(tiny_unet(), "edm", bad)
