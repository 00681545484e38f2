"""Model cards filled from a run's real results, from the templates in ``model_cards/``."""

from __future__ import annotations

import string
from importlib import resources
from pathlib import Path


def write_model_card(output_dir: str | Path, template: str, **fields: object) -> Path:
    """Fill ``model_cards/<template>.md`` (``$name`` placeholders) and write it as ``output_dir/README.md``.

    A placeholder without a value is an error, so a card never ships with a hole in it.
    """
    text = resources.files("medsyn.model_cards").joinpath(f"{template}.md").read_text()
    try:
        card = string.Template(text).substitute({k: str(v) for k, v in fields.items()})
    except KeyError as error:
        raise ValueError(f"model card template {template!r} needs a value for {error.args[0]!r}") from error
    path = Path(output_dir) / "README.md"
    path.write_text(card)
    return path
