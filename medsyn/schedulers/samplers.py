"""The samplers of a score model by name, for ``medsyn generate --sampler`` and the benchmarks.

Each is a scheduler built from the model's own scheduler config (its sigma range), so a name is all a user picks.
The schedulers are imported when one is built: naming them costs nothing (``medsyn --help``).
"""

from __future__ import annotations

from enum import StrEnum


class Sampler(StrEnum):
    LANGEVIN = "langevin"  # annealed Langevin dynamics (NCSN), L levels x T steps + 1 evaluations
    EDM_HEUN = "edm-heun"  # EDM's deterministic Heun, 2N - 1 evaluations
    EDM_HEUN_STOCHASTIC = "edm-heun-stochastic"  # EDM's Heun with S_churn 40, 2N - 1 evaluations
    DPM_SOLVER = "dpm-solver++"  # diffusers' EDMDPMSolverMultistepScheduler (2M), N evaluations
    PREDICTOR_CORRECTOR = "predictor-corrector"  # Song et al.'s PC, one corrector step: 2N evaluations


def sampler_scheduler(sampler: Sampler | str, config):
    """A scheduler for ``sampler`` with the sigma range of ``config`` (a score model's scheduler config)."""
    from diffusers import EDMDPMSolverMultistepScheduler

    from .scheduling_annealed_langevin import AnnealedLangevinScheduler
    from .scheduling_edm_heun import EDMHeunScheduler
    from .scheduling_predictor_corrector import PredictorCorrectorScheduler

    sampler = Sampler(sampler)
    if sampler is Sampler.LANGEVIN:
        return AnnealedLangevinScheduler.from_config(config)
    sigma_range = {"sigma_min": config["sigma_min"], "sigma_max": config["sigma_max"]}
    if sampler is Sampler.EDM_HEUN:
        return EDMHeunScheduler(**sigma_range)
    if sampler is Sampler.EDM_HEUN_STOCHASTIC:
        return EDMHeunScheduler(**sigma_range, s_churn=40.0)
    if sampler is Sampler.PREDICTOR_CORRECTOR:
        return PredictorCorrectorScheduler(**sigma_range)
    return EDMDPMSolverMultistepScheduler(**sigma_range)
