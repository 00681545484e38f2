"""Samplers in the diffusers scheduler contract, and the rules that pick their noise schedules.

Imported on first use (torch and diffusers are heavy), so ``medsyn --help`` can name the samplers at once.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AnnealedLangevinScheduler": ".scheduling_annealed_langevin",
    "AnnealedLangevinSchedulerOutput": ".scheduling_annealed_langevin",
    "EDMHeunScheduler": ".scheduling_edm_heun",
    "EDMHeunSchedulerOutput": ".scheduling_edm_heun",
    "PredictorCorrectorScheduler": ".scheduling_predictor_corrector",
    "PredictorCorrectorSchedulerOutput": ".scheduling_predictor_corrector",
    "NoiseSchedule": ".ncsn_rules",
    "noise_schedule_from_data": ".ncsn_rules",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medsyn.schedulers' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
