"""``medsyn evaluate``: every metric of generated images against real ones, as metrics.json and report.html."""

from .evaluate import evaluate
from .image_sets import ImageSet, load_image_set
from .report import write_report

__all__ = ["ImageSet", "evaluate", "load_image_set", "write_report"]
