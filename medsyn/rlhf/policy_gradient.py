"""Policy gradient on the sampling chain (DDPO, Black et al. 2023) with a KL guard (DPOK, Fan et al. 2023).

Chains are sampled by the model before the update (``SamplingChain.sample``), each with a reward. The loss of one
stochastic step is PPO's clipped surrogate ``max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))`` with
``ratio = pi(x' | x) / pi_old(x' | x)`` and A the advantage: the reward standardised among the chains of the same
prompt (DDPO's per-prompt baseline). At ratio 1, as in the first update after sampling, its gradient is
``-A grad log pi``: REINFORCE with a baseline. The KL guard adds ``kl_weight * KL(pi || pi_ref)`` per step, in
closed form for Gaussians of one std: ``||mean - mean_ref||^2 / (2 std^2)``, with the reference the generator before
any update (``SamplingChain.reference``), so the model cannot drift far for reward alone.
"""

from __future__ import annotations

import torch

from medsyn.rlhf.chain import SamplingChain, Trajectory
from medsyn.rlhf.fitting import DEFAULT_WEIGHT_DECAY, fit_on_minibatches


def per_prompt_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rewards standardised within each group (prompt); a group of one is standardised with all rewards."""
    rewards, groups = torch.as_tensor(rewards, dtype=torch.float32), torch.as_tensor(groups)
    if len(rewards) != len(groups):
        raise ValueError(f"{len(rewards)} rewards for {len(groups)} prompts")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or Inf")
    advantages = torch.empty_like(rewards)
    for group in groups.unique():
        members = groups == group
        pool = rewards[members] if members.sum() > 1 else rewards
        advantages[members] = (rewards[members] - pool.mean()) / (pool.std(unbiased=False) + eps)
    return advantages


def clipped_surrogate(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(PPO's clipped policy loss averaged over the batch, the share of samples whose ratio was clipped)."""
    ratio = torch.exp(log_probs - old_log_probs.to(log_probs.device))
    advantages = advantages.to(log_probs.device)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ((ratio - 1).abs() > clip_range).float().mean()


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: float) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(reference_mean, std^2 I)) per image (B,)."""
    return (mean.float() - reference_mean.float()).pow(2).flatten(1).sum(1) / (2 * std**2)


def reference_mean(chain: SamplingChain, trajectory: Trajectory, k: int) -> torch.Tensor:
    """The reference generator's mean for the k-th stochastic step of ``trajectory``."""
    with torch.no_grad(), chain.reference():
        return chain.step_distribution(trajectory.inputs[k].to(chain.pipe.device), int(trajectory.step_indices[k]),
                                       trajectory.labels)[0]


@torch.no_grad()
def kl_to_reference(chain: SamplingChain, trajectory: Trajectory) -> float:
    """The generator's drift from the reference: KL per chain, summed over its stochastic steps (the KL of the
    whole chain's path distributions), averaged over the chains of ``trajectory``."""
    total = torch.zeros(len(trajectory.labels))
    for k in range(len(trajectory.step_indices)):
        _, mean, std = chain.step_log_prob(trajectory, k)
        total += gaussian_kl(mean, reference_mean(chain, trajectory, k), std).cpu()
    return float(total.mean())


def chain_step_loss(chain: SamplingChain, trajectory: Trajectory, k: int, advantages: torch.Tensor,
                    clip_range: float, kl_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of the k-th stochastic step of ``trajectory`` and its logged parts."""
    log_probs, mean, std = chain.step_log_prob(trajectory, k)
    loss, clipped = clipped_surrogate(log_probs, trajectory.log_probs[k], advantages, clip_range)
    logged = {"policy_loss": loss.item(), "clip_fraction": clipped.item()}
    if kl_weight > 0:
        kl = gaussian_kl(mean, reference_mean(chain, trajectory, k), std).mean()
        loss = loss + kl_weight * kl
        logged["kl"] = kl.item()
    return loss, logged


def policy_gradient_update(chain: SamplingChain, trajectory: Trajectory, rewards: torch.Tensor, updates: int,
                           batch_size: int = 8, steps_per_update: int | None = None, clip_range: float = 1e-4,
                           kl_weight: float = 0.0, learning_rate: float = 1e-4, max_grad_norm: float = 1.0,
                           seed: int = 0, accelerator=None,
                           weight_decay: float = DEFAULT_WEIGHT_DECAY) -> list[dict[str, float]]:
    """``updates`` optimiser steps on the chains of ``trajectory`` (one batch of ``batch_size`` chains each, over
    ``steps_per_update`` of their stochastic steps drawn at random, all by default), back-propagating step by step
    so that memory holds one network evaluation's graph. Advantages are the rewards standardised per class.

    Every process holds the whole trajectory; with ``accelerator`` each works on its share of a batch's chains
    (``fit_on_minibatches``). Returns each update's mean policy loss, clipped share and (with ``kl_weight``) KL to the
    reference.
    """
    if not any(p.requires_grad for p in chain.pipe.unet.parameters()):
        raise ValueError("the generator has no trainable parameter (add LoRA adapters or unfreeze the unet)")
    advantages = per_prompt_advantages(rewards, trajectory.labels)
    num_steps = len(trajectory.step_indices)
    chosen_count = min(steps_per_update or num_steps, num_steps)

    def batch_loss(rows, generator):
        batch = trajectory.rows(rows)
        steps = torch.randperm(num_steps, generator=generator)[:chosen_count].tolist()
        logged = []
        for k in steps:
            loss, parts = chain_step_loss(chain, batch, k, advantages[rows], clip_range, kl_weight)
            (loss / chosen_count).backward()
            logged.append(parts)
        return None, {name: sum(p[name] for p in logged) / len(logged) for name in logged[0]}

    return fit_on_minibatches(chain.pipe.unet, len(rewards), updates, batch_loss, learning_rate, batch_size, seed,
                              max_grad_norm, accelerator, weight_decay)
