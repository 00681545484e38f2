"""The score model's training losses, one class per formulation (as NVlabs/edm ``training/loss.py``).

Both are denoising score matching for a variance-exploding process and return the per-image loss on the same
scale (half the squared error of a unit-variance target summed over an image's values), so ``per_value_scale``
and the learning rates mean the same under either:

- ``NCSNLoss``: levels drawn uniformly from the trained geometric ladder, 1/2 ||sigma s + z||^2 (sigma^2 weighting).
- ``EDMLoss``: ln(sigma) ~ N(P_mean, P_std^2), lambda(sigma) ||D - x0||^2 / 2 with lambda = 1 / c_out^2, so the
  preconditioned network F regresses a unit-variance target at every level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from medsyn.models.preconditioning import EDMPreconditioning, network_denoised, network_score
from medsyn.training.dsm_loss import dsm_loss, perturb


@dataclass
class ScoreLossTerms:
    """One batch's loss and what the alignment term needs: the noisy input and its VE noise level."""

    loss: torch.Tensor  # (B,) per-image loss
    noisy: torch.Tensor
    sigma: torch.Tensor  # (B,)


class NCSNLoss:
    """NCSNv2's multi-scale DSM over the discrete ladder ``sigmas``."""

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas

    def __call__(self, unet, clean: torch.Tensor, labels: torch.Tensor | None,
                 generator: torch.Generator | None) -> ScoreLossTerms:
        noisy, noise, sigma = perturb(clean, self.sigmas, generator=generator)
        score = network_score(unet, noisy, sigma, class_labels=labels)
        return ScoreLossTerms(dsm_loss(score, noise.float(), sigma.float()), noisy, sigma)


class EDMLoss:
    """Karras et al.'s preconditioned DSM: log-normal levels and the 1 / c_out^2 weight.

    Args:
        edm: the preconditioning (the data's standard deviation).
        p_mean, p_std: ln(sigma) ~ N(p_mean, p_std^2); EDM's -1.2 and 1.2 for data in [-1, 1].
    """

    def __init__(self, edm: EDMPreconditioning, p_mean: float = -1.2, p_std: float = 1.2):
        if not p_std > 0:
            raise ValueError(f"p_std must be positive, got {p_std}")
        self.edm, self.p_mean, self.p_std = edm, p_mean, p_std

    def sample_sigma(self, batch_size: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """One log-normal noise level per image."""
        normal = randn_tensor((batch_size,), generator=generator, device=device, dtype=torch.float32)
        return (normal * self.p_std + self.p_mean).exp()

    def __call__(self, unet, clean: torch.Tensor, labels: torch.Tensor | None,
                 generator: torch.Generator | None) -> ScoreLossTerms:
        sigma = self.sample_sigma(clean.shape[0], generator, clean.device)
        noise = randn_tensor(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        noisy = clean + sigma.view(-1, *[1] * (clean.ndim - 1)).to(clean.dtype) * noise
        denoised = network_denoised(unet, noisy, sigma, self.edm, class_labels=labels)
        squared = (denoised - clean.float()).pow(2).flatten(1).sum(dim=1)
        return ScoreLossTerms(0.5 * self.edm.loss_weight(sigma) * squared, noisy, sigma)
