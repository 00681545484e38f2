"""The latent diffusion model's training loss, with diffusers' two optional refinements.

- Min-SNR weighting (Hang et al. 2023, ``--snr_gamma``): each timestep's loss is weighted by min(SNR, gamma),
  expressed for the prediction target: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v.
- Offset noise (``--noise_offset``): a per-image, per-channel constant added to the noise, so the model learns to
  change an image's overall brightness.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-image loss weights of min-SNR-gamma for the scheduler's prediction type."""
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"--snr_gamma: no min-SNR weighting for prediction type {prediction_type!r}")


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """Mean squared error to the target, per image weighted by min-SNR-gamma when ``snr_gamma`` is given."""
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, target.ndim)))
    return (per_image * min_snr_weights(noise_scheduler, timesteps, snr_gamma)).mean()


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator | None) -> torch.Tensor:
    """``noise`` plus ``offset`` x N(0, 1) drawn once per image and channel (constant over the pixels)."""
    shift = torch.randn((*noise.shape[:2], *[1] * (noise.ndim - 2)), generator=generator, device=noise.device)
    return noise + offset * shift.to(noise.dtype)


def noised_with_target(noise_scheduler, clean: torch.Tensor, generator: torch.Generator | None,
                       noise_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ho et al.'s training pair: a uniform timestep per image, the image noised to it, and what the network
    predicts there (the noise, or v for v-prediction). Returns ``(noisy, timesteps, target)``."""
    noise = torch.randn(clean.shape, generator=generator, device=clean.device)
    if noise_offset:
        noise = offset_noise(noise, noise_offset, generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), generator=generator,
                              device=clean.device)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
        noise_scheduler.get_velocity(clean, noise, timesteps)
    return noisy, timesteps, target
