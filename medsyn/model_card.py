"""Model cards filled from a run's real results, from the templates in ``model_cards/``."""

from __future__ import annotations

import string
from importlib import resources
from pathlib import Path

from medsyn.output_files import write_text_atomically


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
    write_text_atomically(path, card)
    return path


EVALUATION_HEADING = "## Evaluation (medsyn evaluate)"


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "n/a" if value is None else str(value)


def evaluation_markdown(metrics: dict) -> str:
    """The model card's evaluation section from ``medsyn evaluate``'s metrics.json: measured numbers only."""
    lines = [EVALUATION_HEADING, "", "| metric | value |", "|---|---|"]
    inputs = metrics["inputs"]
    lines.append(f"| images compared | {inputs['generated']['count']} generated vs {inputs['real']['count']} real |")
    for key, name in (("inception", "Inception"), ("domain", "domain encoder")):
        section = metrics.get(key, {})
        if "note" in section:
            lines.append(f"| {name} metrics | {section['note']} |")
            continue
        lines.append(f"| {name} FID (floor: real half vs real half) | {_number(section['half_size_fid'])} "
                     f"({_number(section['real_halves_fid'])}) at {section['half_size']} images; "
                     f"{_number(section['fid'])} on all |")
        lines.append(f"| {name} precision / recall / density / coverage | " + " / ".join(
            _number(section[k]) for k in ("precision", "recall", "density", "coverage")) + " |")
    diversity = metrics["diversity"]["overall"]
    lines.append(f"| mean pairwise MS-SSIM, generated (real) | {_number(diversity['generated'])} "
                 f"({_number(diversity['real'])}) |")
    pixel = metrics["privacy"].get("pixel")
    if pixel is None:
        lines.append(f"| memorisation audit | {metrics['privacy']['note']} |")
    else:
        lines.append(f"| memorisation audit (pixels), {pixel['num_generated']} images | {pixel['verdict']}; "
                     f"{pixel['num_near_copies']} near-copies, {pixel['num_flagged']} flagged, closest "
                     f"{_number(pixel['min_distance'])}, data-copying Z_U {_number(pixel['data_copying_z'])} |")
    downstream = metrics.get("downstream", {})
    if "runs" in downstream:
        real, mixed = downstream["runs"]["real"], downstream["runs"]["real + synthetic"]
        low, high = downstream["auc_gain_ci"]
        lines.append(f"| downstream test AUC, real / real + synthetic | {_number(real['auc'])} / "
                     f"{_number(mixed['auc'])} (gain 95% CI [{low:+.3f}, {high:+.3f}]) |")
    return "\n".join(lines) + "\n"


def add_evaluation_to_model_card(model_dir: str | Path, metrics: dict) -> Path:
    """Write the evaluation section into ``model_dir/README.md``, replacing an earlier one (the rest is kept)."""
    path = Path(model_dir) / "README.md"
    if not path.is_file():
        raise ValueError(f"{path}: no model card to add the evaluation to")
    text = path.read_text()
    if EVALUATION_HEADING in text:
        before, _, after = text.partition(EVALUATION_HEADING)
        rest = after.split("\n## ", 1)
        text = before + ("## " + rest[1] if len(rest) > 1 else "")
    write_text_atomically(path, text.rstrip("\n") + "\n\n" + evaluation_markdown(metrics))
    return path
