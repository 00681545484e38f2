"""The noise a noise-aware expert classifier is trained on, and how informative it stays at each noise level.

Feature alignment shows the expert the diffusion UNet's noisy input. An expert trained on clean scans never saw
such inputs: under the score model's variance-exploding noise, x + sigma z for sigma up to sigma_max (~18 at 32 px,
~50 at 128 px), its features are noise, and aligning to them teaches nothing. ``train_expert.py --noise_augment``
therefore trains the expert on the diffusion model's own corruption, as classifiers for classifier guidance are
trained, and measures its accuracy per noise level so that alignment can skip the levels where it is guessing.

Both processes are expressed with one noise level, the variance-exploding sigma:

- ``ve`` (score models): ``x + sigma z``. The expert gets it scaled by EDM's c_in, normalised to 1 for clean
  images: ``sigma_data / sqrt(sigma_data^2 + sigma^2)``, so its inputs keep a bounded scale at every level.
- ``ddpm`` (MediSyn's pixel view, which ``add_noise`` builds at the latent's timestep):
  ``sqrt(abar) x + sqrt(1 - abar) z = (x + sigma z) / sqrt(1 + sigma^2)`` with ``sigma = sqrt((1 - abar) / abar)``;
  it is bounded already and is not rescaled.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: EDM's data standard deviation for images in [-1, 1].
SIGMA_DATA = 0.5

#: MediSyn's DDPM noise schedule (Stable Diffusion's), the default of ``--noise_augment ddpm``.
MEDISYN_BETAS = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


class NoiseProcess(StrEnum):
    VE = "ve"
    DDPM = "ddpm"


@dataclass
class ExpertNoise:
    """One diffusion model's corruption, as the expert is trained on it.

    Args:
        process: ``ve`` or ``ddpm``.
        sigma_min, sigma_max: the VE range (training draws sigma log-uniformly in it).
        num_train_timesteps, beta_schedule, beta_start, beta_end: the DDPM schedule (training draws t uniformly).
    """

    process: NoiseProcess
    sigma_min: float | None = None
    sigma_max: float | None = None
    num_train_timesteps: int = MEDISYN_BETAS["num_train_timesteps"]
    beta_schedule: str = MEDISYN_BETAS["beta_schedule"]
    beta_start: float = MEDISYN_BETAS["beta_start"]
    beta_end: float = MEDISYN_BETAS["beta_end"]
    _timestep_sigmas: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            self.process = NoiseProcess(self.process)
        except ValueError:
            raise ValueError(f"noise process {self.process!r}: expected one of {[p.value for p in NoiseProcess]}") \
                from None
        if self.process is NoiseProcess.VE:
            if self.sigma_min is None or self.sigma_max is None or not 0 < self.sigma_min < self.sigma_max:
                raise ValueError(f"the ve process needs 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
                                 f"sigma_max={self.sigma_max}")
        else:
            from diffusers import DDPMScheduler

            scheduler = DDPMScheduler(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                                      beta_start=self.beta_start, beta_end=self.beta_end)
            alphas = scheduler.alphas_cumprod.double()
            self._timestep_sigmas = ((1 - alphas) / alphas).sqrt()

    @classmethod
    def from_ddpm_scheduler(cls, scheduler) -> ExpertNoise:
        """The process of a diffusers DDPM-family scheduler (its betas)."""
        config = scheduler.config
        return cls(NoiseProcess.DDPM, num_train_timesteps=config.num_train_timesteps,
                   beta_schedule=config.beta_schedule, beta_start=config.beta_start, beta_end=config.beta_end)

    def to_dict(self) -> dict:
        keep = ("sigma_min", "sigma_max") if self.process is NoiseProcess.VE else tuple(MEDISYN_BETAS)
        return {"process": self.process.value, **{key: getattr(self, key) for key in keep}}

    @classmethod
    def from_dict(cls, values: dict) -> ExpertNoise:
        return cls(**values)

    def timestep_sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The VE-equivalent sigma of DDPM timesteps."""
        if self._timestep_sigmas is None:
            raise ValueError("timesteps belong to the ddpm process, not to ve")
        return self._timestep_sigmas.to(timesteps.device)[timesteps.long()].float()

    def sample_sigmas(self, count: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """One training noise level per image: log-uniform for ve, a uniform timestep for ddpm."""
        if self.process is NoiseProcess.VE:
            u = torch.rand(count, generator=generator, device=device, dtype=torch.float64)
            return torch.exp(math.log(self.sigma_min) + u * math.log(self.sigma_max / self.sigma_min)).float()
        timesteps = torch.randint(0, self.num_train_timesteps, (count,), generator=generator, device=device)
        return self.timestep_sigmas(timesteps)

    def evaluation_sigmas(self, count: int = 10) -> list[float]:
        """Levels spanning the process, for the accuracy table: geometric for ve, evenly spaced timesteps for ddpm."""
        if self.process is NoiseProcess.VE:
            return np.geomspace(self.sigma_min, self.sigma_max, count).tolist()
        timesteps = torch.linspace(0, self.num_train_timesteps - 1, count).round().long()
        return self.timestep_sigmas(timesteps).tolist()

    def corrupt(self, images: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] at per-image levels ``sigma`` (B,), as the diffusion model noises them."""
        sigma = sigma.to(images.dtype).reshape(-1, *[1] * (images.ndim - 1))
        noisy = images + sigma * noise
        return noisy if self.process is NoiseProcess.VE else noisy / (1 + sigma**2).sqrt()

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """What corrupted images are multiplied by before the expert sees them (1 for clean images)."""
        if self.process is NoiseProcess.DDPM:
            return torch.ones_like(sigma)
        return SIGMA_DATA / (SIGMA_DATA**2 + sigma**2).sqrt()

    def expert_view(self, corrupted: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Images corrupted at per-image levels ``sigma`` (B,) as the expert sees them, in training and in
        alignment alike."""
        return corrupted * self.input_scale(sigma.float()).to(corrupted).reshape(-1, *[1] * (corrupted.ndim - 1))

    def check_serves(self, other: ExpertNoise) -> None:
        """Refuse an expert trained on another process; warn where the diffusion model's VE range exceeds it."""
        if other.process is not self.process:
            raise ValueError(f"--align_expert was trained on {self.process.value} noise, but this model is trained "
                             f"with {other.process.value} noise: train the expert with --noise_augment "
                             f"{other.process.value}")
        if self.process is NoiseProcess.DDPM and other.to_dict() != self.to_dict():
            raise ValueError(f"--align_expert was trained on the DDPM schedule {self.to_dict()}, but this model uses "
                             f"{other.to_dict()}")
        if self.process is NoiseProcess.VE and other.sigma_max > self.sigma_max * 1.05:
            logger.warning(f"the model's sigma_max {other.sigma_max:.3g} exceeds the expert's {self.sigma_max:.3g}; "
                           f"above it the expert's accuracy is taken as at its own sigma_max")


@dataclass
class NoiseAccuracy:
    """The expert's held-out accuracy per noise level, and the alignment weight it implies.

    A level is informative when the accuracy beats chance (1 / number of classes) by ``min_margin``; its weight is
    the accuracy above chance as a fraction of the best level's, and 0 where it is not informative. Between the
    measured levels the accuracy is interpolated in log sigma; outside them it is held at the nearest end.
    """

    sigmas: list[float]
    accuracies: list[float]
    chance: float

    def __post_init__(self) -> None:
        if len(self.sigmas) != len(self.accuracies) or not self.sigmas:
            raise ValueError(f"{len(self.sigmas)} noise levels for {len(self.accuracies)} accuracies")
        if any(s <= 0 for s in self.sigmas) or list(self.sigmas) != sorted(self.sigmas):
            raise ValueError(f"the noise levels must be positive and ascending, got {self.sigmas}")

    def accuracy(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.detach().double().clamp_min(1e-12).log().cpu().numpy()
        values = np.interp(log_sigma, np.log(self.sigmas), self.accuracies)
        return torch.as_tensor(values, dtype=torch.float32, device=sigma.device)

    def weights(self, sigma: torch.Tensor, min_margin: float) -> torch.Tensor:
        """Per-image alignment weights in [0, 1] at levels ``sigma`` (B,)."""
        best = max(self.accuracies) - self.chance
        if best <= min_margin:
            return torch.zeros_like(sigma, dtype=torch.float32)
        excess = self.accuracy(sigma) - self.chance
        return torch.where(excess >= min_margin, excess / best, torch.zeros_like(excess)).clamp(0, 1)

    def informative_range(self, min_margin: float) -> tuple[float, float] | None:
        """The smallest and largest measured sigma whose accuracy is informative (None: no level is)."""
        kept = [s for s, a in zip(self.sigmas, self.accuracies) if a - self.chance >= min_margin]
        return (min(kept), max(kept)) if kept else None

    def to_dict(self) -> dict:
        return asdict(self)
