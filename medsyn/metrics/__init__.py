"""Measures of synthetic images against real ones."""

from .feature_distances import frechet_distance, kernel_distance
from .label_probe import LabelProbe, LabelProbeReport, fit_label_probe, label_probe_report

__all__ = ["LabelProbe", "LabelProbeReport", "fit_label_probe", "frechet_distance", "kernel_distance", "label_probe_report"]
