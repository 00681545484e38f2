"""medsyn: diffusion models for privacy-safe synthetic medical images.

Heavy modules (torch, diffusers) are imported on first use, so ``medsyn --help`` starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ClassConditionalDDPMPipeline": "medsyn.pipelines",
    "MediSynPipeline": "medsyn.pipelines",
    "ScoreLangevinPipeline": "medsyn.pipelines",
    "AnnealedLangevinScheduler": "medsyn.schedulers",
    "EDMHeunScheduler": "medsyn.schedulers",
    "PredictorCorrectorScheduler": "medsyn.schedulers",
    "build_score_unet": "medsyn.models.score_unet",
    "score_unet_config": "medsyn.models.score_unet",
    "ddpm_unet_config": "medsyn.models.ddpm_unet",
    "load_image_dataset": "medsyn.data",
    "SimulatedBrainMRI": "medsyn.data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medsyn' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
