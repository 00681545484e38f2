"""How a score UNet's raw output becomes the score s(x, sigma): the one place every caller asks.

Two parameterisations of the same variance-exploding denoising score-matching model:

- ``ncsn`` (NCSNv2): the UNet sees x unscaled and the level as log(sigma) (diffusers' Fourier embedding takes the
  log itself), and its output, divided by sigma by ``UNet2DModel``, is the score.
- ``edm`` (Karras et al. 2022): D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) with c_in = 1 / sqrt(sigma^2 +
  sd^2), c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2) and c_noise = ln(sigma) / 4, where
  sd is the data's standard deviation. ``UNet2DModel`` embeds log(t) and divides its output by t, so it is called
  with t = exp(c_noise) = sigma^(1/4) and its output multiplied by t again: F is the network's own output. The
  score is Tweedie's (D - x) / sigma^2.

The parameterisation is saved in the UNet's config (``_score_preconditioning``; a missing key means ``ncsn``, so
every model saved before EDM loads as it was), so pipelines, membership attacks, RLHF chains, feature alignment and
the training script all read it from the network they hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

from medsyn.validation import finite_number

#: The UNet config key that records the parameterisation (a leading underscore: diffusers keeps it, unwarned).
CONFIG_KEY = "_score_preconditioning"


class Preconditioning(StrEnum):
    """How a score UNet's output is read."""

    NCSN = "ncsn"
    EDM = "edm"


@dataclass(frozen=True)
class EDMPreconditioning:
    """Karras et al.'s coefficients for data of standard deviation ``sigma_data``."""

    sigma_data: float

    def __post_init__(self):
        finite_number(self.sigma_data, "sigma_data", minimum=0, exclusive=True)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` at the levels ``sigma``, each of ``sigma``'s shape."""
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        return sd2 / total, sigma * self.sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2: the loss on F has unit weight."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


def set_preconditioning(unet, preconditioning: Preconditioning | str, sigma_data: float | None = None) -> None:
    """Record the parameterisation in ``unet``'s config (saved with it)."""
    preconditioning = Preconditioning(preconditioning)
    if preconditioning is Preconditioning.EDM:
        EDMPreconditioning(sigma_data)  # validates
        unet.register_to_config(**{CONFIG_KEY: {"type": "edm", "sigma_data": float(sigma_data)}})
    else:
        unet.register_to_config(**{CONFIG_KEY: {"type": "ncsn"}})


def _unwrapped(unet):
    """The diffusers model inside DDP (``module``) or Opacus (``_module``) wrappers."""
    while not hasattr(unet, "config") and (hasattr(unet, "module") or hasattr(unet, "_module")):
        unet = getattr(unet, "module", None) or unet._module
    return unet


def _dtype(unet) -> torch.dtype:
    """The unet's dtype (a diffusers model's own, or its first parameter's behind a wrapper)."""
    dtype = getattr(unet, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(unet.parameters()).dtype


def edm_preconditioning(unet) -> EDMPreconditioning | None:
    """The EDM coefficients of ``unet`` (wrappers looked through), or None for an NCSN-parameterised network."""
    config = getattr(_unwrapped(unet), "config", None)
    saved = config.get(CONFIG_KEY) if hasattr(config, "get") else getattr(config, CONFIG_KEY, None)
    saved = saved or {"type": "ncsn"}
    kind = Preconditioning(saved.get("type", "ncsn"))
    return EDMPreconditioning(float(saved["sigma_data"])) if kind is Preconditioning.EDM else None


def _levels(sigma: torch.Tensor | float, sample: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=sample.device, dtype=torch.float32)
    return sigma.expand(sample.shape[0]) if sigma.ndim == 0 else sigma


def network_denoised(unet, sample: torch.Tensor, sigma: torch.Tensor | float, edm: EDMPreconditioning,
                     **conditioning) -> torch.Tensor:
    """D(x, sigma) of an EDM-preconditioned ``unet`` in float32 (the unet runs in its own dtype)."""
    sigma = _levels(sigma, sample)
    c_skip, c_out, c_in, c_noise = (c.view(-1, *[1] * (sample.ndim - 1)) for c in edm.coefficients(sigma))
    t = c_noise.exp().flatten()  # UNet2DModel embeds log(t) = c_noise and divides its output by t
    dtype = _dtype(unet)
    raw = unet((c_in * sample).to(dtype), t.to(dtype), **conditioning).sample.float()
    return c_skip * sample.float() + c_out * (raw * t.view_as(c_noise))


def network_score(unet, sample: torch.Tensor, sigma: torch.Tensor | float, **conditioning) -> torch.Tensor:
    """The score s(x, sigma) of a score UNet of either parameterisation, in float32.

    Args:
        unet: a score ``UNet2DModel`` (its config says how to read it).
        sample: noisy images (B, C, H, W).
        sigma: the noise level, a number or one per image (B,).
        conditioning: passed to the unet (``class_labels``).
    """
    edm = edm_preconditioning(unet)
    if edm is None:  # sigma goes in as given (a number or one per image), as NCSN models were always called
        sigma = torch.as_tensor(sigma, device=sample.device)
        return unet(sample.to(_dtype(unet)), sigma, **conditioning).sample.float()
    sigma = _levels(sigma, sample)
    denoised = network_denoised(unet, sample, sigma, edm, **conditioning)
    return (denoised - sample.float()) / sigma.view(-1, *[1] * (sample.ndim - 1)) ** 2
