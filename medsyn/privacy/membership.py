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
label is known, else with the null (unconditional) class. A latent (MediSyn) model is attacked in its latent
space, with the image's caption when the caller knows it (a stronger attack), else the empty caption.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum

import numpy as np
import torch

from medsyn.models.preconditioning import network_score
from medsyn.seeding import keyed_generator

from .statistics import binary_auc


class AttackMethod(StrEnum):
    LOSS = "loss"
    PIA = "pia"
    LIRA = "lira"
    """The loss statistic, read against reference models' (``medsyn.privacy.reference_attack``)."""


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
    """A model's noise estimate at a level, for DDPM (epsilon or v prediction), score (VE) and latent (MediSyn)
    pipelines alike. A latent model is attacked in its latent space: the image's posterior mean under the model's
    own VAE, scaled as the unet learned it, is the clean sample."""

    def __init__(self, pipe):
        from medsyn.pipelines import ClassConditionalDDPMPipeline, MediSynPipeline, ScoreLangevinPipeline

        if isinstance(pipe, ClassConditionalDDPMPipeline | MediSynPipeline):
            self.kind = "latent" if isinstance(pipe, MediSynPipeline) else "ddpm"
            self.alphas = pipe.scheduler.alphas_cumprod.double()
            self.steps = pipe.scheduler.config.num_train_timesteps
            self.prediction = pipe.scheduler.config.prediction_type
        elif isinstance(pipe, ScoreLangevinPipeline):
            self.kind = "score"
            self.sigma_min = float(pipe.scheduler.config.sigma_min)
            self.sigma_max = float(pipe.scheduler.config.sigma_max)
        else:
            raise ValueError(f"membership attacks cover medsyn's DDPM, score and MediSyn models, not "
                             f"{type(pipe).__name__}")
        self.pipe, self.unet = pipe, pipe.unet
        self.in_channels = pipe.vae.config.in_channels if self.kind == "latent" else pipe.unet.config.in_channels

    def level(self, fraction: float) -> float:
        """The timestep (DDPM, latent) or sigma (score model) ``fraction`` of the way from the clean end."""
        if self.kind == "score":
            return self.sigma_min * (self.sigma_max / self.sigma_min) ** fraction
        return float(min(self.steps - 1, max(1, round(fraction * self.steps))))

    @torch.no_grad()
    def clean(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model's clean sample of images in [-1, 1]: the images, or a latent model's unit latents."""
        if self.kind != "latent":
            return pixels
        from medsyn.models.latent_diffusion import unit_latents

        return unit_latents(self.pipe.vae, pixels.to(self.pipe.vae.dtype), None, posterior_mean=True)

    @torch.no_grad()
    def conditioning(self, labels: torch.Tensor | None, prompts: list[str] | None, count: int, device) -> dict:
        """The unet's conditioning keywords: class labels, or a latent model's prompt states (the empty caption,
        its unconditional prompt, where none is given)."""
        if self.kind == "latent":
            states, mask, _, _ = self.pipe.encode_prompt(prompts if prompts is not None else [""] * count, device, 1,
                                                         do_classifier_free_guidance=False)
            return {"encoder_hidden_states": states, "encoder_attention_mask": mask}
        return {"class_labels": None if labels is None else labels.to(device)}

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, level: float) -> torch.Tensor:
        if self.kind == "score":
            return clean + level * noise
        alpha = self.alphas[int(level)]
        return (alpha.sqrt() * clean + (1 - alpha).sqrt() * noise).float()

    @torch.no_grad()
    def noise_estimate(self, noisy: torch.Tensor, level: float, conditioning: dict) -> torch.Tensor:
        """The model's estimate of the standard normal noise in ``noisy`` at ``level``."""
        batch = torch.full((len(noisy),), level, dtype=torch.float32 if self.kind == "score" else torch.long,
                           device=noisy.device)
        if self.kind == "score":
            return -level * network_score(self.unet, noisy, batch, **conditioning)  # s(x, sigma) = -eps / sigma
        output = self.unet(noisy, batch, **conditioning).sample.float()
        if self.prediction == "v_prediction":
            alpha = self.alphas[int(level)].float()
            return alpha.sqrt() * output + (1 - alpha).sqrt() * noisy  # eps from v
        return output

    def clean_noise_estimate(self, clean: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """PIA's eps_0: the estimate at the cleanest level (t = 0, or sigma_min)."""
        return self.noise_estimate(clean, self.sigma_min if self.kind == "score" else 0.0, conditioning)


def _labels_for(pipe, labels: list[int | None] | None, count: int) -> torch.Tensor | None:
    from medsyn.models.score_unet import null_class_label

    null = null_class_label(pipe.unet)
    if null is None:
        return None
    return torch.tensor([null if labels is None or labels[i] is None else labels[i] for i in range(count)])


def membership_statistics(pipe, images: torch.Tensor, labels: list[int | None] | None = None,
                          settings: AttackSettings = AttackSettings(), prompts: list[str] | None = None) -> np.ndarray:
    """One statistic per image (uint8 (N, C, H, W)), higher meaning more likely a training image. Image i's noise
    is drawn from (seed, level, draw, i), so its statistic does not depend on the batch it was in. ``labels``
    condition a class-conditional model, ``prompts`` (one per image) a latent one."""
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    denoiser = _Denoiser(pipe)
    if images.shape[1] != denoiser.in_channels:
        raise ValueError(f"the model takes {denoiser.in_channels}-channel images, got {images.shape[1]}")
    if prompts is not None and denoiser.kind != "latent":
        raise ValueError(f"prompts condition a MediSyn model; {type(pipe).__name__} takes class labels")
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
    all_labels = None if denoiser.kind == "latent" else _labels_for(pipe, labels, len(images))
    device = next(itertools.chain(pipe.unet.parameters(), pipe.unet.buffers())).device
    statistics = np.zeros(len(images))
    for start in range(0, len(images), settings.batch_size):
        rows = range(start, min(start + settings.batch_size, len(images)))
        clean = denoiser.clean((images[rows.start : rows.stop].float() / 127.5 - 1).to(device))
        conditioning = denoiser.conditioning(
            None if all_labels is None else all_labels[rows.start : rows.stop],
            None if prompts is None else prompts[rows.start : rows.stop], len(rows), device)
        total = torch.zeros(len(rows), dtype=torch.float64)
        if settings.method is AttackMethod.PIA:
            eps_0 = denoiser.clean_noise_estimate(clean, conditioning)
        for level_index, fraction in enumerate(settings.noise_levels):
            level = denoiser.level(fraction)
            if settings.method is AttackMethod.PIA:
                estimate = denoiser.noise_estimate(denoiser.noised(clean, eps_0, level), level, conditioning)
                distance = (estimate - eps_0).abs().pow(settings.norm).flatten(1).sum(1).pow(1 / settings.norm)
                total += distance.double().cpu()
                continue
            for draw in range(settings.draws):
                noise = torch.stack([torch.randn(clean.shape[1:], generator=keyed_generator(
                    settings.seed, level_index, draw, i)) for i in rows]).to(device)
                estimate = denoiser.noise_estimate(denoiser.noised(clean, noise, level), level, conditioning)
                total += (estimate - noise).pow(2).flatten(1).mean(1).double().cpu() / settings.draws
        statistics[rows.start : rows.stop] = -(total / len(settings.noise_levels)).numpy()
    return statistics


def roc_points(member_stats: np.ndarray, non_member_stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve, (false-positive rates, true-positive rates) from (0, 0), as the threshold falls past each
    image (ties in input order)."""
    scores = np.concatenate([member_stats, non_member_stats])
    order = np.argsort(-scores, kind="stable")
    member = np.concatenate([np.ones(len(member_stats)), np.zeros(len(non_member_stats))])[order]
    return (np.concatenate([[0], np.cumsum(1 - member) / (1 - member).sum()]),
            np.concatenate([[0], np.cumsum(member) / member.sum()]))


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


def attack_report(member_stats: np.ndarray, non_member_stats: np.ndarray, settings,
                  resamples: int = 1000, exposed: int = 10) -> AttackReport:
    """AUC and TPR at 1% / 0.1% FPR with 95% bootstrap CIs (members and non-members resampled apart).
    ``settings``: the attack's settings dataclass (``AttackSettings``, ``ReleasedSetSettings``), with its
    ``method`` and the bootstrap's ``seed``."""
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
