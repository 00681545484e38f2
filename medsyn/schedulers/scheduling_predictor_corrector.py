"""Song et al.'s (2021) predictor-corrector sampler for the variance-exploding SDE, as a diffusers scheduler.

At each of N geometric noise levels sigma_1 > ... > sigma_N (sigma_{N+1} = 0) it takes ``correct_steps``
Langevin corrector steps at signal-to-noise ratio r,

    x <- x + e s(x, sigma_i) + sqrt(2 e) z,    e = 2 (r ||z|| / ||s(x, sigma_i)||)^2,

then one reverse-diffusion predictor step

    x <- x + (sigma_i^2 - sigma_{i+1}^2) s(x, sigma_i) + sqrt(sigma_i^2 - sigma_{i+1}^2) z,

without noise on the last, as diffusers' ``ScoreSdeVePipeline`` returns the predictor's mean. ``timesteps``
holds the sigma of every network evaluation (N (correct_steps + 1) in all) and ``model_output`` is the score, as
for annealed Langevin.

Why not diffusers' ``ScoreSdeVeScheduler``: its corrector takes the norms averaged over the batch, so an image
would depend on the images sampled beside it; here each image's step uses its own norms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from medsyn.schedulers.evaluation_schedule import EvaluationSchedule
from medsyn.schedulers.scheduling_annealed_langevin import geometric_sigmas
from medsyn.validation import finite_number, whole_number

#: Levels when none are asked for.
DEFAULT_LEVELS = 100


@dataclass
class PredictorCorrectorSchedulerOutput(BaseOutput):
    """Output of one evaluation's step.

    Args:
        prev_sample: where the network is evaluated next (after the last step: the sample).
        pred_original_sample: the Tweedie estimate x + sigma^2 s of the clean image.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class PredictorCorrectorScheduler(EvaluationSchedule, SchedulerMixin, ConfigMixin):
    """Reverse-diffusion predictor with Langevin corrector (Song et al. 2021) for a score network.

    Swap it into a ``ScoreLangevinPipeline`` with ``PredictorCorrectorScheduler.from_config(pipe.scheduler.config)``.
    ``num_inference_steps`` N levels cost N (correct_steps + 1) network evaluations.

    Args:
        sigma_max, sigma_min: the range of the geometric levels.
        snr: the corrector's signal-to-noise ratio r (0.16 in Song et al. for CIFAR-10).
        correct_steps: corrector steps per level (0: the predictor alone, ancestral sampling).
    """

    order = 1
    #: what ``step`` takes as ``model_output`` (see ``medsyn.schedulers.denoiser``)
    model_output_type = "score"

    @register_to_config
    def __init__(self, sigma_max: float = 50.0, sigma_min: float = 0.01, snr: float = 0.16, correct_steps: int = 1):
        finite_number(snr, "snr", minimum=0, exclusive=True)
        whole_number(correct_steps, "correct_steps", minimum=0)
        self.set_timesteps(DEFAULT_LEVELS)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """Build the schedule of N levels (N = ``num_inference_steps``, default 100)."""
        levels = whole_number(DEFAULT_LEVELS if num_inference_steps is None else num_inference_steps,
                              "num_inference_steps", minimum=2)
        self.num_inference_steps = levels
        self.sigmas = geometric_sigmas(self.config.sigma_max, self.config.sigma_min, levels)
        self.timesteps = self.sigmas.repeat_interleave(self.config.correct_steps + 1).to(device=device,
                                                                                          dtype=torch.float32)
        self.init_noise_sigma = self.config.sigma_max
        self._step_index = 0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> PredictorCorrectorSchedulerOutput | tuple:
        """A corrector or predictor step, whichever comes next in the schedule.

        Args:
            model_output: the score s(sample, timestep).
            timestep: the sigma it was evaluated at, ``timesteps[step_index]``.
            sample: the point it was evaluated at.
            generator: the only source of noise; a list gives one generator per batch item.
            return_dict: return a ``PredictorCorrectorSchedulerOutput`` rather than a tuple.
        """
        self._check_step(model_output, sample)
        score = model_output.to(sample.dtype)
        level, position = divmod(self._step_index, self.config.correct_steps + 1)
        sigma = float(self.sigmas[level])
        is_last = level == len(self.sigmas) - 1 and position == self.config.correct_steps
        noise = None if is_last else randn_tensor(sample.shape, generator=generator, device=sample.device,
                                                  dtype=sample.dtype)
        if position < self.config.correct_steps:  # Langevin corrector, each image with its own norms
            dims = tuple(range(1, sample.ndim))
            ratio = torch.linalg.vector_norm(noise, dim=dims) / torch.linalg.vector_norm(score, dim=dims)
            step = (2 * (self.config.snr * ratio) ** 2).view(-1, *[1] * (sample.ndim - 1))
            prev_sample = sample + step * score + torch.sqrt(2 * step) * noise
        else:  # reverse-diffusion predictor
            sigma_next = float(self.sigmas[level + 1]) if level + 1 < len(self.sigmas) else 0.0
            variance = sigma**2 - sigma_next**2
            prev_sample = sample + variance * score
            if noise is not None:
                prev_sample = prev_sample + math.sqrt(variance) * noise
        self._step_index += 1
        pred_original_sample = sample + sigma**2 * score
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return PredictorCorrectorSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
