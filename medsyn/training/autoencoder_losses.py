"""Losses of the autoencoder stage beyond L1 and KL: a perceptual loss on a user's feature network, and the
adversarial weight schedule.

The adversarial loss and the PatchGAN discriminator are MONAI's (``PatchAdversarialLoss``,
``PatchDiscriminator``), as in MONAI's latent diffusion tutorial. MONAI's own perceptual loss downloads its
network at run time; this one takes any transformers vision model the user has locally (an ImageNet ResNet50,
or medsyn's expert classifier), since no such weights ship offline.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn

from medsyn.metrics.features import PooledImageEncoder


class FeaturePerceptualLoss(nn.Module):
    """LPIPS-style distance without learned layer weights: at every stage of a frozen backbone, the squared
    difference of channel-normalised features, averaged over positions; then averaged over stages.

    Args:
        encoder: the frozen feature network; it stays in eval mode and receives no gradient.
    """

    def __init__(self, encoder: PooledImageEncoder) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path: str) -> FeaturePerceptualLoss:
        return cls(PooledImageEncoder.from_pretrained(path))

    def train(self, mode: bool = True) -> FeaturePerceptualLoss:
        return super().train(False)  # frozen BatchNorm statistics, whatever the training loop asks

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean distance between images in [-1, 1] (B, C, H, W)."""
        both = torch.cat([reconstruction, target]) / 2 + 0.5
        distances = []
        for features in self.encoder.feature_maps(both):
            if features.ndim != 4:  # token sequences (ViT): (B, N, D) -> (B, D, N, 1)
                features = features.transpose(1, 2).unsqueeze(-1)
            features = features / (features.norm(dim=1, keepdim=True) + 1e-10)
            fake, real = features.chunk(2)
            distances.append((fake - real).pow(2).sum(dim=1).mean())
        return torch.stack(distances).mean()


def adversarial_weight(step: int, weight: float, warmup_steps: int) -> float:
    """The adversarial loss weight at optimiser ``step``: zero during the reconstruction-only warm-up."""
    return weight if step >= warmup_steps else 0.0


class VariationalReconstruction(nn.Module):
    """An ``AutoencoderKL`` pass as one module: sample a latent from the posterior, decode it, and return the
    reconstruction with the batch's mean KL divergence to N(0, I).

    ``AutoencoderKL.forward`` returns only the reconstruction; training needs the posterior too, and under DDP the
    pass must go through one wrapped module's ``forward`` for the gradients to be synchronised.
    """

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        reconstruction = self.vae.decode(posterior.sample(generator=generator)).sample
        return reconstruction, posterior.kl().mean()
