"""Membership inference: can someone holding the model tell whether a given scan was in its training set?

The nearest-neighbour audit checks the images a model happened to generate; these attacks ask the model itself.
Each gives every candidate image a statistic, higher for "more likely a member", and the report measures how well
it separates known members (a sample of the training set) from non-members (held-out images of the same
distribution): ROC AUC, and the true-positive rate at 1% and 0.1% false positives (Carlini et al. 2022), each with
a bootstrap CI over both sets.

- ``loss`` (Carlini et al. 2023, "Extracting training data from diffusion models"): the model's own training loss
  on the image at a few noise levels, averaged over seeded noise draws; members are denoised better.
- ``pia`` (Kong et al. 2024, proximal initialisation): the noise is not drawn but taken from the model itself,
  eps_0 = the model's noise estimate on the clean image; the image is moved to level t along it, and the statistic
  is the l_p distance between the model's noise estimate there and eps_0, one deterministic pass per level.
  For a DDPM: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_0 with eps_0 = eps(x_0, t=0). For a variance-exploding
  score model, the same idea in its own terms: eps_0 = -sigma_min s(x_0, sigma_min), x_sigma = x_0 + sigma eps_0,
  distance between sigma s(x_sigma, sigma) and -eps_0.

Noise levels are given as fractions of the schedule from the clean end (0.1: timestep 100 of 1,000 for a DDPM;
for a score model the sigma a tenth of the way, geometrically, from sigma_min to sigma_max). Small levels are
where memorisation shows. Images are attacked with their class label when the model is class-conditional and the
label is known, else with the null (unconditional) class. Latent (MediSyn) models are not covered yet.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum

import numpy as np
import torch

from medsyn.seeding import keyed_generator

from .statistics import binary_auc


class AttackMethod(StrEnum):
    LOSS = "loss"
    PIA = "pia"


@dataclass(frozen=True)
class AttackSettings:
    method: AttackMethod = AttackMethod.LOSS
    noise_levels: tuple[float, ...] = (0.02, 0.05, 0.1)
    """Fractions of the noise schedule, from the clean end."""
    draws: int = 4
    """Noise draws per level (the loss attack; PIA draws none)."""
    norm: float = 4.0
    """p of PIA's l_p distance."""
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self):
        if not self.noise_levels or not all(0 < f <= 1 for f in self.noise_levels):
            raise ValueError(f"noise_levels must be fractions in (0, 1], got {self.noise_levels}")
        if self.draws < 1 or self.batch_size < 1 or self.norm <= 0:
            raise ValueError("draws and batch_size must be >= 1 and norm > 0")


class _Denoiser:
    """A model's noise estimate at a level, for DDPM (epsilon or v prediction) and score (VE) pipelines alike."""

    def __init__(self, pipe):
        from medsyn.pipelines import ClassConditionalDDPMPipeline, ScoreLangevinPipeline

        if isinstance(pipe, ClassConditionalDDPMPipeline):
            self.kind = "ddpm"
            self.alphas = pipe.scheduler.alphas_cumprod.double()
            self.steps = pipe.scheduler.config.num_train_timesteps
            self.prediction = pipe.scheduler.config.prediction_type
        elif isinstance(pipe, ScoreLangevinPipeline):
            self.kind = "score"
            self.sigma_min = float(pipe.scheduler.config.sigma_min)
            self.sigma_max = float(pipe.scheduler.config.sigma_max)
        else:
            raise ValueError(f"membership attacks cover medsyn's DDPM and score models; {type(pipe).__name__} "
                             "(a latent model) is not covered yet")
        self.unet = pipe.unet

    def level(self, fraction: float) -> float:
        """The timestep (DDPM) or sigma (score model) ``fraction`` of the way from the clean end."""
        if self.kind == "ddpm":
            return float(min(self.steps - 1, max(1, round(fraction * self.steps))))
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** fraction

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, level: float) -> torch.Tensor:
        if self.kind == "ddpm":
            alpha = self.alphas[int(level)]
            return (alpha.sqrt() * clean + (1 - alpha).sqrt() * noise).float()
        return clean + level * noise

    @torch.no_grad()
    def noise_estimate(self, noisy: torch.Tensor, level: float, labels: torch.Tensor | None) -> torch.Tensor:
        """The model's estimate of the standard normal noise in ``noisy`` at ``level``."""
        batch = torch.full((len(noisy),), level, dtype=torch.float32 if self.kind == "score" else torch.long)
        output = self.unet(noisy, batch, class_labels=labels).sample.float()
        if self.kind == "score":
            return -level * output  # s(x, sigma) = -eps / sigma
        if self.prediction == "v_prediction":
            alpha = self.alphas[int(level)].float()
            return alpha.sqrt() * output + (1 - alpha).sqrt() * noisy  # eps from v
        return output

    def clean_noise_estimate(self, clean: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """PIA's eps_0: the estimate at the cleanest level (t = 0, or sigma_min)."""
        return self.noise_estimate(clean, 0.0 if self.kind == "ddpm" else self.sigma_min, labels)


def _labels_for(pipe, labels: list[int | None] | None, count: int) -> torch.Tensor | None:
    from medsyn.models.score_unet import null_class_label

    null = null_class_label(pipe.unet)
    if null is None:
        return None
    return torch.tensor([null if labels is None or labels[i] is None else labels[i] for i in range(count)])


def membership_statistics(pipe, images: torch.Tensor, labels: list[int | None] | None = None,
                          settings: AttackSettings = AttackSettings()) -> np.ndarray:
    """One statistic per image (uint8 (N, C, H, W)), higher meaning more likely a training image. Image i's noise
    is drawn from (seed, level, draw, i), so its statistic does not depend on the batch it was in."""
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    denoiser = _Denoiser(pipe)
    if images.shape[1] != pipe.unet.config.in_channels:
        raise ValueError(f"the model takes {pipe.unet.config.in_channels}-channel images, got {images.shape[1]}")
    all_labels = _labels_for(pipe, labels, len(images))
    device = next(itertools.chain(pipe.unet.parameters(), pipe.unet.buffers())).device
    statistics = np.zeros(len(images))
    for start in range(0, len(images), settings.batch_size):
        rows = range(start, min(start + settings.batch_size, len(images)))
        clean = (images[rows.start : rows.stop].float() / 127.5 - 1).to(device)
        batch_labels = None if all_labels is None else all_labels[rows.start : rows.stop].to(device)
        total = torch.zeros(len(rows), dtype=torch.float64)
        if settings.method is AttackMethod.PIA:
            eps_0 = denoiser.clean_noise_estimate(clean, batch_labels)
        for level_index, fraction in enumerate(settings.noise_levels):
            level = denoiser.level(fraction)
            if settings.method is AttackMethod.PIA:
                estimate = denoiser.noise_estimate(denoiser.noised(clean, eps_0, level), level, batch_labels)
                distance = (estimate - eps_0).abs().pow(settings.norm).flatten(1).sum(1).pow(1 / settings.norm)
                total += distance.double().cpu()
                continue
            for draw in range(settings.draws):
                noise = torch.stack([torch.randn(clean.shape[1:], generator=keyed_generator(
                    settings.seed, level_index, draw, i)) for i in rows]).to(device)
                estimate = denoiser.noise_estimate(denoiser.noised(clean, noise, level), level, batch_labels)
                total += (estimate - noise).pow(2).flatten(1).mean(1).double().cpu() / settings.draws
        statistics[rows.start : rows.stop] = -(total / len(settings.noise_levels)).numpy()
    return statistics


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float) -> float:
    """The share of members above the strictest threshold that lets at most floor(fpr x n) non-members through
    (ties go against membership): with few non-members, 0.1% FPR means no false positive at all."""
    allowed = math.floor(fpr * len(non_members))
    threshold = np.sort(non_members)[::-1][min(allowed, len(non_members) - 1)]
    return float((members > threshold).mean())


@dataclass
class AttackReport:
    method: str
    members: int
    non_members: int
    auc: float
    auc_ci: list[float]
    leakage_auc: float
    """max(AUC, 1 - AUC): a statistic that separates the sets in reverse (AUC well below 0.5) exposes membership
    just as well, to anyone who flips it."""
    tpr_at_1pct_fpr: float
    tpr_at_1pct_fpr_ci: list[float]
    tpr_at_0_1pct_fpr: float
    tpr_at_0_1pct_fpr_ci: list[float]
    most_exposed_members: list[int]
    """Member indices, most member-like first: the training images the model gives away most."""
    settings: dict = field(default_factory=dict)
    member_statistics: list[float] = field(default_factory=list)
    non_member_statistics: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def attack_report(member_stats: np.ndarray, non_member_stats: np.ndarray, settings: AttackSettings,
                  resamples: int = 1000, exposed: int = 10) -> AttackReport:
    """AUC and TPR at 1% / 0.1% FPR with 95% bootstrap CIs (members and non-members resampled apart)."""
    if len(member_stats) < 2 or len(non_member_stats) < 2:
        raise ValueError("need at least 2 members and 2 non-members")

    def measures(m: np.ndarray, n: np.ndarray) -> tuple[float, float, float]:
        scores = np.concatenate([m, n])
        positive = np.concatenate([np.ones(len(m), bool), np.zeros(len(n), bool)])
        return binary_auc(scores, positive), tpr_at_fpr(m, n, 0.01), tpr_at_fpr(m, n, 0.001)

    rng = np.random.default_rng(settings.seed)
    boot = np.array([measures(rng.choice(member_stats, len(member_stats)),
                              rng.choice(non_member_stats, len(non_member_stats))) for _ in range(resamples)])
    ci = [np.percentile(boot[:, k], [2.5, 97.5]).tolist() for k in range(3)]
    auc, tpr_1, tpr_01 = measures(member_stats, non_member_stats)
    return AttackReport(
        method=str(settings.method), members=len(member_stats), non_members=len(non_member_stats),
        auc=auc, auc_ci=ci[0], leakage_auc=max(auc, 1 - auc), tpr_at_1pct_fpr=tpr_1, tpr_at_1pct_fpr_ci=ci[1],
        tpr_at_0_1pct_fpr=tpr_01,
        tpr_at_0_1pct_fpr_ci=ci[2], most_exposed_members=np.argsort(-member_stats)[:exposed].tolist(),
        settings={**asdict(settings), "method": str(settings.method)},
        member_statistics=member_stats.tolist(), non_member_statistics=non_member_stats.tolist(),
    )
