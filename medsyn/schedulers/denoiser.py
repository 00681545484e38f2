"""A noise-conditional score network seen as the denoiser of a variance-exploding process.

Tweedie's formula gives D(x, sigma) = x + sigma^2 s(x, sigma), the posterior mean of the clean image; the
probability-flow ODE is dx/dsigma = (x - D) / sigma. Samplers differ in what they take as ``model_output``: the
score (annealed Langevin), the denoised image (``EDMHeunScheduler``), or, for diffusers' EDM schedulers, the
output F of an EDM-preconditioned network, whose denoised image is c_skip(sigma) x + c_out(sigma) F. The last is
affine in F, so F = (D - c_skip x) / c_out is recovered exactly from the scheduler's own ``precondition_outputs``.
Classifier-free guidance combines scores, so it combines denoised images by the same rule.
"""

from __future__ import annotations

from enum import StrEnum

import torch


class SamplerInput(StrEnum):
    """What a scheduler's ``step`` takes as ``model_output``."""

    SCORE = "score"
    DENOISED = "denoised"
    PRECONDITIONED = "preconditioned"


def sampler_input(scheduler) -> SamplerInput:
    """What ``scheduler.step`` expects; an error naming the supported samplers for any other scheduler."""
    kind = getattr(scheduler, "model_output_type", None)
    if kind is not None:
        return SamplerInput(kind)
    if hasattr(scheduler, "precondition_outputs") and hasattr(scheduler, "sigmas"):
        return SamplerInput.PRECONDITIONED
    raise ValueError(
        f"{type(scheduler).__name__} does not sample a variance-exploding score model: use AnnealedLangevinScheduler, "
        "EDMHeunScheduler, PredictorCorrectorScheduler, or one of diffusers' EDM schedulers "
        "(EDMDPMSolverMultistepScheduler, EDMEulerScheduler)"
    )


def to_scheduler_output(scheduler, kind: SamplerInput, sample: torch.Tensor, score: torch.Tensor,
                        sigma: torch.Tensor | float) -> torch.Tensor:
    """The score turned into what ``scheduler.step`` takes."""
    if kind is SamplerInput.SCORE:
        return score
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
    denoised = sample + sigma**2 * score
    if kind is SamplerInput.DENOISED:
        return denoised
    skip = scheduler.precondition_outputs(sample, torch.zeros_like(sample), sigma)
    scale = scheduler.precondition_outputs(torch.zeros_like(sample[:1]), torch.ones_like(sample[:1]), sigma)
    return (denoised - skip) / scale
