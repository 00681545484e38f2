"""medsyn's diffusers pipelines, one module per pipeline (installed as ``medsyn.pipelines``)."""

from .pipeline_medisyn import MediSynPipeline
from .pipeline_score_langevin import ScoreLangevinPipeline

__all__ = ["MediSynPipeline", "ScoreLangevinPipeline"]
