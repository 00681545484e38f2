"""Privacy checks on synthetic images: does any of them copy a training image?"""

from .image_arrays import Layout, as_image_stack
from .memorisation import (
    NEAR_COPY_DISTANCE,
    AuditSpace,
    MemorisationAudit,
    calibrate_threshold,
    held_out_exchangeability,
    memorisation_audit,
    save_flagged_pairs,
)
from .nearest_neighbours import nearest_neighbours
from .statistics import data_copying_test, exchangeability_test, flagged_count_test

__all__ = [
    "NEAR_COPY_DISTANCE",
    "AuditSpace",
    "Layout",
    "MemorisationAudit",
    "as_image_stack",
    "calibrate_threshold",
    "data_copying_test",
    "exchangeability_test",
    "flagged_count_test",
    "held_out_exchangeability",
    "memorisation_audit",
    "nearest_neighbours",
    "save_flagged_pairs",
]
