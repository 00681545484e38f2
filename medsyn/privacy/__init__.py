"""Privacy checks on synthetic images: does any of them copy a training image?"""

from .memorisation import MemorisationAudit, calibrate_threshold, memorisation_audit, save_flagged_pairs
from .nearest_neighbours import nearest_neighbours

__all__ = [
    "MemorisationAudit",
    "calibrate_threshold",
    "memorisation_audit",
    "nearest_neighbours",
    "save_flagged_pairs",
]
