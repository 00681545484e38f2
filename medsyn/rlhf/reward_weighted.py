"""Reward-weighted fine-tuning (Lee et al. 2023, "Aligning text-to-image models using human feedback").

The generator's own training loss on its generated images, each weighted by its reward (zero for what the selector
rejects), plus ``pretrain_weight`` times the same loss on the original training images, so that the model learns
what scored well without drifting from the data:

    L = mean_i w_i l(x_i, c_i) + beta * mean_j l(x_j, c_j),    x_i generated, x_j real.

This is maximum likelihood on the reward-filtered samples, the filter-and-update half of MINIM's loop.
"""

from __future__ import annotations

import torch

from medsyn.rlhf.chain import SamplingChain
from medsyn.rlhf.fitting import DEFAULT_WEIGHT_DECAY, fit_on_minibatches


def reward_weights(rewards: torch.Tensor, accepted: torch.Tensor | None = None) -> torch.Tensor:
    """Each generated image's weight: its reward, or 0 where the selector rejected it."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if not torch.isfinite(rewards).all() or (rewards < 0).any():
        raise ValueError("rewards must be finite and non-negative to weight a likelihood")
    if accepted is None:
        return rewards
    accepted = torch.as_tensor(accepted, dtype=torch.bool)
    if accepted.shape != rewards.shape:
        raise ValueError(f"{len(accepted)} accept decisions for {len(rewards)} rewards")
    return torch.where(accepted, rewards, torch.zeros_like(rewards))


def reward_weighted_update(chain: SamplingChain, images: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                           updates: int, real_images: torch.Tensor | None = None,
                           real_labels: torch.Tensor | None = None, pretrain_weight: float = 1.0,
                           batch_size: int = 16, learning_rate: float = 1e-4, max_grad_norm: float = 1.0,
                           seed: int = 0, accelerator=None,
                           weight_decay: float = DEFAULT_WEIGHT_DECAY) -> list[dict[str, float]]:
    """``updates`` optimiser steps of the weighted loss on generated ``images`` (in [-1, 1]) with their class
    ``labels`` and ``weights``, mixed with the real images when given (``pretrain_weight`` > 0).

    Generated batches are drawn from the images of positive weight; with ``accelerator`` each process takes its share
    of a batch (``fit_on_minibatches``). Returns each update's generated and real loss.
    """
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if not len(images) == len(labels) == len(weights):
        raise ValueError(f"{len(images)} images, {len(labels)} labels and {len(weights)} weights")
    kept = (weights > 0).nonzero()[:, 0]
    if len(kept) == 0:
        raise ValueError("every weight is 0 (the selector accepted nothing): nothing to fine-tune on")
    mixing = real_images is not None and pretrain_weight > 0
    if mixing and (real_labels is None or len(real_labels) != len(real_images)):
        raise ValueError("real_images need one label each")
    device = chain.pipe.device

    def batch_loss(rows, generator):
        # The losses draw noise on the model's device, from a generator seeded by the loop's.
        generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        chosen = kept[rows]
        generated = chain.denoising_loss(images[chosen].to(device), labels[chosen].to(device), generator)
        loss = (weights[chosen].to(device) * generated).mean()
        logged = {"generated_loss": generated.mean().item()}
        if mixing:
            real_rows = torch.randint(len(real_images), (len(rows),), generator=generator, device=device).cpu()
            real = chain.denoising_loss(real_images[real_rows].to(device), real_labels[real_rows].to(device),
                                        generator).mean()
            loss = loss + pretrain_weight * real
            logged["real_loss"] = real.item()
        return loss, logged

    return fit_on_minibatches(chain.pipe.unet, len(kept), updates, batch_loss, learning_rate, batch_size, seed,
                              max_grad_norm, accelerator, weight_decay)
