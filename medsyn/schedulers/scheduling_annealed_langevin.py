"""Annealed Langevin dynamics (Song & Ermon 2019; NCSNv2, 2020) as a diffusers scheduler.

The noise levels are a geometric sequence sigma_1 > ... > sigma_L. At each level the sampler takes
``n_steps_each`` Langevin steps

    x <- x + eta_i * s(x, sigma_i) + sqrt(2 * eta_i) * z,    eta_i = alpha * sigma_i^2 / sigma_L^2,

and, optionally, one last noise-free Tweedie step x <- x + sigma_L^2 * s(x, sigma_L) that removes the
residual noise of the smallest level. ``timesteps`` holds the sigma of every network evaluation in order (each
level repeated ``n_steps_each`` times, plus the final denoising one), so a pipeline loop is the usual
``for t in timesteps: s = unet(x, t); x = scheduler.step(s, t, x).prev_sample`` with one evaluation per step.
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
from medsyn.schedulers.ncsn_rules import langevin_step_size
from medsyn.validation import finite_number, whole_number


@dataclass
class AnnealedLangevinSchedulerOutput(BaseOutput):
    """Output of one Langevin step.

    Args:
        prev_sample: the sample after this step, input to the next network evaluation.
        pred_original_sample: the Tweedie estimate x + sigma^2 * score of the clean image from the step's input.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def geometric_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> torch.Tensor:
    """Geometric noise levels from ``sigma_max`` down to ``sigma_min`` (both included), float64."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_levels, dtype=torch.float64))


class AnnealedLangevinScheduler(EvaluationSchedule, SchedulerMixin, ConfigMixin):
    """Sampler for noise-conditional score networks by annealed Langevin dynamics.

    Args:
        num_train_timesteps: number of noise levels L the score network was trained on.
        sigma_max: largest noise level sigma_1 (NCSNv2 technique 1: the largest pairwise distance in the data).
        sigma_min: smallest noise level sigma_L.
        step_size: alpha in eta_i = alpha * sigma_i^2 / sigma_L^2 (NCSNv2 technique 4 picks it).
        n_steps_each: Langevin steps per noise level.
        denoise_final: end with the noise-free step x + sigma_L^2 * s(x, sigma_L).
    """

    order = 1
    #: what ``step`` takes as ``model_output`` (see ``medsyn.schedulers.denoiser``)
    model_output_type = "score"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 232,
        sigma_max: float = 50.0,
        sigma_min: float = 0.01,
        step_size: float = 6.2e-6,
        n_steps_each: int = 5,
        denoise_final: bool = True,
    ):
        if step_size <= 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.sigmas = geometric_sigmas(sigma_max, sigma_min, num_train_timesteps)
        self.init_noise_sigma = sigma_max
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        n_steps_each: int | None = None,
        step_size: float | None = None,
    ) -> None:
        """Build the sampling schedule.

        Args:
            num_inference_steps: number of noise levels L to anneal through (default: the trained L). The levels
                stay geometric between ``sigma_max`` and ``sigma_min``.
            device: where ``timesteps`` live.
            n_steps_each: Langevin steps per level (default: the config's).
            step_size: alpha for this schedule. Default: the config's for the trained schedule; for any other
                number of levels or steps, NCSNv2's technique 4 for that schedule (the trained alpha, kept, made
                samples with fewer levels collapse).
        """
        # None means the default; 0 is an error, not the default.
        num_levels = whole_number(
            self.config.num_train_timesteps if num_inference_steps is None else num_inference_steps,
            "num_inference_steps", minimum=2)
        n_steps_each = whole_number(self.config.n_steps_each if n_steps_each is None else n_steps_each, "n_steps_each")
        if step_size is None:
            trained = (num_levels, n_steps_each) == (self.config.num_train_timesteps, self.config.n_steps_each)
            step_size = self.config.step_size if trained else self._technique_four(num_levels, n_steps_each)
        step_size = finite_number(step_size, "step_size", 0, True)
        self.num_inference_steps = num_levels
        self.n_steps_each = n_steps_each
        self.step_size = step_size
        self.sigmas = geometric_sigmas(self.config.sigma_max, self.config.sigma_min, num_levels)
        timesteps = self.sigmas.repeat_interleave(n_steps_each)
        if self.config.denoise_final:
            timesteps = torch.cat([timesteps, self.sigmas[-1:]])
        self.timesteps = timesteps.to(device=device, dtype=torch.float32)
        self._step_index = 0

    def _technique_four(self, num_levels: int, n_steps_each: int) -> float:
        cache = self.__dict__.setdefault("_step_sizes", {})
        if (num_levels, n_steps_each) not in cache:
            cache[num_levels, n_steps_each] = langevin_step_size(
                self.config.sigma_max, self.config.sigma_min, num_levels, n_steps_each)
        return cache[num_levels, n_steps_each]

    def step_eta(self, sigma: float) -> float:
        """eta_i = alpha * sigma_i^2 / sigma_L^2, the step size of a Langevin step at level ``sigma`` in this
        schedule: the step is N(x + eta s, 2 eta I)."""
        return self.step_size * (float(sigma) / self.config.sigma_min) ** 2

    def is_final_denoise(self, step_index: int) -> bool:
        """Whether step ``step_index`` of the schedule is the last, noise-free Tweedie step."""
        return self.config.denoise_final and step_index == len(self.timesteps) - 1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> AnnealedLangevinSchedulerOutput | tuple:
        """Take the next step of the schedule.

        Args:
            model_output: the score s(sample, timestep), same shape as ``sample``.
            timestep: the sigma the score was evaluated at, ``timesteps[step_index]``.
            sample: the current sample.
            generator: the only source of the Langevin noise; a list gives one generator per batch item.
            return_dict: return an ``AnnealedLangevinSchedulerOutput`` rather than a tuple.
        """
        self._check_step(model_output, sample)
        sigma = float(timestep)
        score = model_output.to(sample.dtype)
        pred_original_sample = sample + sigma**2 * score
        if self.is_final_denoise(self._step_index):
            prev_sample = pred_original_sample
        else:
            eta = self.step_eta(sigma)
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = sample + eta * score + math.sqrt(2.0 * eta) * noise
        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return AnnealedLangevinSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
