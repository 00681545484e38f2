"""medsyn's diffusers pipelines, one module per pipeline (installed as ``medsyn.pipelines``)."""

from __future__ import annotations

import json
from pathlib import Path

from .pipeline_medisyn import MediSynPipeline
from .pipeline_score_langevin import ScoreLangevinPipeline

__all__ = ["MediSynPipeline", "ScoreLangevinPipeline", "load_pipeline"]


def load_pipeline(path: str | Path):
    """A saved medsyn pipeline of whichever class its ``model_index.json`` names (diffusers' own
    ``DiffusionPipeline.from_pretrained`` looks for that class in diffusers, where medsyn's are not)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{path}: not a saved pipeline (no model_index.json)")
    name = json.loads(index.read_text()).get("_class_name")
    classes = {cls.__name__: cls for cls in (MediSynPipeline, ScoreLangevinPipeline)}
    if name not in classes:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(path)
    return classes[name].from_pretrained(path)
