"""What several commands share."""

from __future__ import annotations

import sys
from pathlib import Path

SETS_HELP = " (folder, manifest or .npz; PATH:key=value selects, e.g. data.npz:split=training,part=1/2)"
"""How the image-set flags of evaluate and attack are spelt."""


def would_overwrite(targets: list[Path], overwrite: bool) -> bool:
    """True, after saying which file is in the way, when a target exists and --overwrite was not given."""
    clashes = [t for t in targets if t.exists()]
    if clashes and not overwrite:
        more = f" ({len(clashes)} files would be overwritten)" if len(clashes) > 1 else ""
        print(f"error: {clashes[0]} exists{more}; pass --overwrite", file=sys.stderr)
        return True
    return False

