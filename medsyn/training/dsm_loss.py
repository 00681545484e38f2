"""Multi-scale denoising score matching (Song & Ermon 2019).

For a noise level sigma the perturbation kernel N(x; x0, sigma^2 I) has score -(x - x0) / sigma^2 = -z / sigma,
so the network is trained to predict it. With the lambda(sigma) = sigma^2 weighting the per-level losses have the
same scale, and the objective is 1/2 * || sigma * s(x, sigma) + z ||^2 summed over pixels, averaged over images
and over levels drawn uniformly.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor


def perturb(
    clean: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one noise level per image uniformly from ``sigmas`` and add that much Gaussian noise.

    Returns:
        ``(noisy, noise, sigma)`` with ``noisy = clean + sigma * noise`` and ``sigma`` of shape (B,).
    """
    index = torch.randint(len(sigmas), (clean.shape[0],), generator=generator, device=sigmas.device)
    sigma = sigmas[index].to(device=clean.device, dtype=clean.dtype)
    noise = randn_tensor(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    return clean + sigma.view(-1, *[1] * (clean.ndim - 1)) * noise, noise, sigma


def dsm_loss(score: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image sigma^2-weighted DSM loss 1/2 ||sigma * score + noise||^2, shape (B,).

    Args:
        score: the network's score at the noisy images.
        noise: the standard normal noise that was added, scaled by ``sigma``.
        sigma: noise level of each image, shape (B,).
    """
    if score.shape != noise.shape:
        raise ValueError(f"score shape {tuple(score.shape)} != noise shape {tuple(noise.shape)}")
    residual = sigma.view(-1, *[1] * (score.ndim - 1)).to(score.dtype) * score + noise
    return 0.5 * residual.pow(2).flatten(1).sum(dim=1)


def per_value_scale(sample: torch.Tensor) -> float:
    """``dsm_loss`` over the per-value mean squared error of the noise it implies (``-sigma * score`` against ``z``):
    half of one image's value count.

    A term weighted for a per-value mean loss (diffusers' DDPM MSE, MediSyn's, the feature-aligned paper's) is
    multiplied by this before it is added to ``dsm_loss``, so that its weight means the same at every resolution
    and in every training script.

    Args:
        sample: a batch of images (B, C, H, W).
    """
    return sample[0].numel() / 2
