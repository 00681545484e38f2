"""medsyn's diffusers pipelines, one module per pipeline (installed as ``medsyn.pipelines``)."""

from __future__ import annotations

import json
from pathlib import Path

from .pipeline_class_conditional_ddpm import ClassConditionalDDPMPipeline
from .pipeline_medisyn import MediSynPipeline
from .pipeline_score_langevin import ScoreLangevinPipeline

__all__ = ["ClassConditionalDDPMPipeline", "MediSynPipeline", "ScoreLangevinPipeline", "load_pipeline"]


def load_pipeline(path: str | Path):
    """A saved medsyn pipeline, from a folder or a Hub id, of whichever class its ``model_index.json`` names
    (diffusers' own ``DiffusionPipeline.from_pretrained`` looks for that class in diffusers, where medsyn's are
    not)."""
    if Path(path).is_dir():
        index = Path(path) / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{path}: not a saved pipeline (no model_index.json)")
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(str(path), "model_index.json"))
        except Exception as error:  # invalid id, unknown repo, offline without a cached copy: one line, not a trace
            raise ValueError(f"{path}: no such folder, and no pipeline with that Hub id could be read "
                             f"({type(error).__name__})") from error
    name = json.loads(index.read_text()).get("_class_name")
    if isinstance(name, list):  # a folder that ships its code: ["module", "Class"]
        name = name[-1]
    classes = {cls.__name__: cls for cls in (ClassConditionalDDPMPipeline, MediSynPipeline, ScoreLangevinPipeline)}
    if name not in classes:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(path)
    return classes[name].from_pretrained(path)
