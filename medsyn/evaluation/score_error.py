"""Error analysis of a trained score model: its denoising score-matching error at each noise level.

On held-out real images, each level's sigma^2-weighted DSM loss is divided by the loss of a model that
predicts a zero score (1/2 E||z||^2 = D/2): 0 is a perfect score, 1 knows nothing. Where this relative error
stays high, sampling at that level drifts; high at small sigma means fine detail is not learned, high at
large sigma means the global layout is not.
"""

from __future__ import annotations

import numpy as np
import torch

from medsyn.models.preconditioning import network_score
from medsyn.seeding import keyed_generator
from medsyn.training.dsm_loss import dsm_loss


@torch.no_grad()
def per_sigma_score_error(
    pipeline,
    images: torch.Tensor,
    labels: np.ndarray | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """Relative DSM error per trained noise level of a ``ScoreLangevinPipeline`` on uint8 images (N, C, H, W).

    Labels (class indices) are passed to a class-conditional model; an unconditional model ignores them.
    Image i's noise at level j depends only on (seed, i, j), so two models are compared on the same noise.
    """
    unet, scheduler = pipeline.unet, pipeline.scheduler
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != shape or images.dtype != torch.uint8:
        raise ValueError(f"the model takes uint8 images {shape}, got {images.dtype} {tuple(images.shape[1:])}")
    conditional = unet.config.num_class_embeds is not None
    if conditional and labels is None:
        raise ValueError("this model is class-conditional: pass the images' labels")
    device = unet.device
    sigmas = scheduler.sigmas.float()
    sigmas = sigmas[sigmas > 0]  # EDM Heun's schedule ends at 0, where no score is defined
    dimension = float(np.prod(shape))
    totals = torch.zeros(len(sigmas), dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        clean = images[start : start + batch_size].float().to(device) / 127.5 - 1.0
        batch_labels = torch.as_tensor(labels[start : start + len(clean)], device=device) if conditional else None
        for level, sigma in enumerate(sigmas):
            noise = torch.stack([
                torch.randn(shape, generator=keyed_generator(seed, start + i, level)) for i in range(len(clean))
            ]).to(device)
            sigma_batch = sigma.to(device).expand(len(clean))
            score = network_score(unet, clean + sigma * noise, sigma_batch, class_labels=batch_labels)
            totals[level] += dsm_loss(score, noise, sigma_batch).double().sum().cpu()
    relative = (totals / len(images) / (dimension / 2)).tolist()
    return {"sigma": sigmas.tolist(), "relative_dsm_error": relative, "images": len(images)}
