"""EDM's sampler (Karras et al. 2022, Algorithm 2) for variance-exploding score models, as a diffusers scheduler.

A noise-conditional score network is a denoiser: D(x, sigma) = x + sigma^2 s(x, sigma) (Tweedie). The
probability-flow ODE of the variance-exploding process, dx/dsigma = (x - D(x, sigma)) / sigma, is integrated
with Heun's second-order method over Karras et al.'s noise levels

    t_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,   t_N = 0,

and with ``s_churn`` > 0 each step first adds noise to climb from t_i to t_hat_i = (1 + gamma_i) t_i (the
stochastic sampler). ``timesteps`` holds the sigma of every network evaluation in order (two per step, one for
the last), and the pipeline passes the denoised prediction D as ``model_output``; each ``step`` returns the
point where the network is evaluated next. So the loop is the same as annealed Langevin's, with D for the score.

Why not diffusers' ``EDMEulerScheduler``: it adds the churn noise after the network has been evaluated at the
un-noised point, has no second-order step, takes preconditioned network outputs, and starts from a
variance-preserving prior of sqrt(sigma_max^2 + 1).
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
from medsyn.validation import finite_number, whole_number

#: Steps when none are asked for: EDM's choice (35 network evaluations).
DEFAULT_STEPS = 18


@dataclass
class EDMHeunSchedulerOutput(BaseOutput):
    """Output of one evaluation's step.

    Args:
        prev_sample: where the network is evaluated next (after the last step: the sample).
        pred_original_sample: the denoised prediction this step used.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def karras_sigmas(sigma_max: float, sigma_min: float, num_steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al.'s ``num_steps`` noise levels from ``sigma_max`` down to ``sigma_min``, float64."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    high, low = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (high + ramp * (low - high)) ** rho


class EDMHeunScheduler(EvaluationSchedule, SchedulerMixin, ConfigMixin):
    """EDM's deterministic (``s_churn=0``) or stochastic Heun sampler for denoisers of a variance-exploding process.

    Swap it into a ``ScoreLangevinPipeline`` with ``EDMHeunScheduler.from_config(pipe.scheduler.config)``: it takes
    the score model's ``sigma_max`` and ``sigma_min``. ``num_inference_steps`` N costs 2N - 1 network evaluations.

    Args:
        sigma_max: largest noise level; the prior is N(0, t_hat_0^2 I).
        sigma_min: smallest nonzero noise level (the last step goes from it to 0 with Euler).
        rho: the schedule's curvature (7 in EDM).
        s_churn: total stochasticity; gamma_i = min(s_churn / N, sqrt(2) - 1) where s_tmin <= t_i <= s_tmax.
        s_tmin, s_tmax: the noise-level range where noise is added.
        s_noise: scale of the added noise (slightly above 1 offsets the denoiser's smoothing).
    """

    order = 2
    #: what ``step`` takes as ``model_output`` (see ``medsyn.schedulers.denoiser``)
    model_output_type = "denoised"

    @register_to_config
    def __init__(
        self,
        sigma_max: float = 80.0,
        sigma_min: float = 0.002,
        rho: float = 7.0,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
    ):
        finite_number(rho, "rho", minimum=0, exclusive=True)
        finite_number(s_churn, "s_churn", minimum=0)
        finite_number(s_noise, "s_noise", minimum=0)
        self.set_timesteps(DEFAULT_STEPS)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """Build the schedule of N steps (N = ``num_inference_steps``, default 18 as in EDM)."""
        steps = whole_number(DEFAULT_STEPS if num_inference_steps is None else num_inference_steps,
                             "num_inference_steps", minimum=2)
        config = self.config
        levels = karras_sigmas(config.sigma_max, config.sigma_min, steps, config.rho)
        gammas = torch.tensor([min(config.s_churn / steps, math.sqrt(2) - 1) if config.s_tmin <= t <= config.s_tmax
                               else 0.0 for t in levels.tolist()], dtype=torch.float64)
        self.num_inference_steps = steps
        self.sigmas = torch.cat([levels, levels.new_zeros(1)])  # t_0 .. t_{N-1}, t_N = 0
        self.sigma_hats = levels * (1 + gammas)
        evaluations = []
        for i in range(steps):
            evaluations.append(self.sigma_hats[i])
            if i < steps - 1:
                evaluations.append(self.sigmas[i + 1])
        self._evaluation_sigmas = torch.stack(evaluations)  # float64, what the steps compute with
        self.timesteps = self._evaluation_sigmas.to(device=device, dtype=torch.float32)
        self.init_noise_sigma = float(self.sigma_hats[0])
        self._step_index = 0
        self._first_order: tuple[torch.Tensor, torch.Tensor] | None = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> EDMHeunSchedulerOutput | tuple:
        """Advance past one network evaluation.

        Args:
            model_output: the denoised prediction D(sample, timestep).
            timestep: the sigma it was evaluated at, ``timesteps[step_index]``.
            sample: the point it was evaluated at (the previous step's ``prev_sample``).
            generator: the only source of the churn noise; a list gives one generator per batch item.
            return_dict: return an ``EDMHeunSchedulerOutput`` rather than a tuple.
        """
        self._check_step(model_output, sample)
        denoised = model_output.to(sample.dtype)
        step = (self._step_index + 1) // 2  # evaluations: hat_0, (1, hat_1), (2, hat_2), ... pairs after the first
        sigma = float(self._evaluation_sigmas[self._step_index])  # ``timestep`` is its float32 copy
        if self._first_order is None:  # evaluated at (x_hat_i, t_hat_i): an Euler step to t_{i+1}
            sigma_next = float(self.sigmas[step + 1])
            slope = (sample - denoised) / sigma
            prev_sample = sample + (sigma_next - sigma) * slope
            if sigma_next > 0:
                self._first_order = (sample, slope)
        else:  # evaluated at the Euler point at t_{i+1}: Heun's correction, then the churn of step i+1
            x_hat, slope = self._first_order
            sigma_hat = float(self.sigma_hats[step - 1])
            corrected = (sample - denoised) / sigma
            x_next = x_hat + (sigma - sigma_hat) * (slope + corrected) / 2
            self._first_order = None
            rise = float(self.sigma_hats[step]) ** 2 - sigma**2
            if rise > 0:
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
                x_next = x_next + self.config.s_noise * math.sqrt(rise) * noise
            prev_sample = x_next
        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return EDMHeunSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
