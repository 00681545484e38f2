"""Model cards a Hub reviewer accepts, filled from a run's real results (templates in ``model_cards/``).

The YAML metadata is built here and checked by huggingface_hub's ``ModelCard``: ``base_model`` and ``datasets``
hold Hub ids only (a local path is named in the text instead, never in the metadata), ``inference: false``. Until
the model has a Hub id, the card says ``YOUR_HUB_USER/<name>``; ``medsyn push`` puts the real id in.
"""

from __future__ import annotations

import os
import string
from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from medsyn.output_files import write_text_atomically
from medsyn.pipelines.hub_folder import REPO_ID_PLACEHOLDER_USER

#: template -> (library_name, pipeline_tag, method tags)
CARD_KINDS = {
    "score_langevin": ("diffusers", "unconditional-image-generation", ["score-based", "ncsn", "annealed-langevin"]),
    "ddpm": ("diffusers", "unconditional-image-generation", ["ddpm", "pixel-diffusion", "classifier-free-guidance"]),
    "medisyn": ("diffusers", "text-to-image", ["medisyn", "latent-diffusion", "text-to-image"]),
    "medisyn_lora": ("diffusers", "text-to-image", ["medisyn", "lora", "text-to-image"]),
    "autoencoder": ("diffusers", None, ["autoencoder", "autoencoderkl", "latent-diffusion"]),
    "expert": ("transformers", "image-classification", ["resnet", "feature-aligned-diffusion"]),
    "selector": ("transformers", "image-classification", ["vit", "rlhf", "reward-model"]),
}

CITATIONS = {
    "score_langevin": [
        "Song & Ermon. Generative Modeling by Estimating Gradients of the Data Distribution. NeurIPS 2019.",
        "Song & Ermon. Improved Techniques for Training Score-Based Generative Models. NeurIPS 2020.",
        "Ho & Salimans. Classifier-Free Diffusion Guidance. 2022.",
    ],
    "ddpm": [
        "Ho et al. Denoising Diffusion Probabilistic Models. NeurIPS 2020.",
        "Ho & Salimans. Classifier-Free Diffusion Guidance. 2022.",
        "Lu et al. DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models. 2022.",
    ],
    "medisyn": [
        "Cho et al. MediSyn: Text-Guided Diffusion Models for Broad Medical 2D and 3D Image Synthesis. 2024.",
        "Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models. CVPR 2022.",
        "Ho & Salimans. Classifier-Free Diffusion Guidance. 2022.",
    ],
    "autoencoder": [
        "Kingma & Welling. Auto-Encoding Variational Bayes. ICLR 2014.",
        "Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models. CVPR 2022.",
    ],
    "expert": ["He et al. Deep Residual Learning for Image Recognition. CVPR 2016."],
}
CITATIONS["selector"] = [
    "Wang et al. Self-improving generative foundation model for synthetic medical image generation and clinical "
    "applications (MINIM). Nature Medicine 2024.",
    "Lee et al. Aligning Text-to-Image Models using Human Feedback. 2023.",
    "Dosovitskiy et al. An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale. ICLR 2021.",
]
CITATIONS["medisyn_lora"] = CITATIONS["medisyn"] + ["Hu et al. LoRA: Low-Rank Adaptation of Large Language Models. "
                                                    "ICLR 2022."]


def hub_id(name: str | os.PathLike | None) -> str | None:
    """``name`` when it is a Hub repo id (``user/name``) and not a local path, else None."""
    if name is None or os.path.exists(name) or str(name).count("/") != 1:
        return None
    try:
        validate_repo_id(str(name))
    except HFValidationError:
        return None
    return str(name)


def card_reference(name: str | os.PathLike) -> str:
    """How a card names a model or dataset it came from: a Hub id as it is, a local path by its last part only
    (a hospital's folder layout is nobody's business, and means nothing to a reader of the Hub)."""
    return f"`{hub_id(name)}`" if hub_id(name) else f"`{Path(str(name)).name}` (local)"


def card_repo_id(hub_model_id: str | None, output_dir: Path) -> str:
    """The id the card's snippets load: the Hub id when known, else ``YOUR_HUB_USER/<name>`` for push to fill."""
    return hub_id(hub_model_id) or f"{REPO_ID_PLACEHOLDER_USER}/{hub_model_id or output_dir.name}"


def card_metadata(template: str, license: str, base_model: str | None, dataset: str | None,
                  class_conditional: bool = False) -> ModelCardData:
    """The card's metadata. A class-conditional pixel model has no Hub task of its own: it gets no pipeline tag
    (``unconditional-image-generation`` would tell the Hub the labels do nothing) and a tag that says what it is."""
    library, pipeline_tag, method_tags = CARD_KINDS[template]
    if class_conditional and pipeline_tag == "unconditional-image-generation":
        pipeline_tag, method_tags = None, [*method_tags, "class-conditional-image-generation"]
    tags = ["medsyn", "medical-imaging", *(["synthetic-data", "diffusers"] if library == "diffusers" else []),
            *method_tags]
    extra = {"license_name": "training-data-terms", "license_link": "README.md"} if license == "other" else {}
    return ModelCardData(license=license, library_name=library, pipeline_tag=pipeline_tag, tags=tags,
                         base_model=hub_id(base_model), datasets=[hub_id(dataset)] if hub_id(dataset) else None,
                         inference=False, **extra)


def write_model_card(output_dir: str | Path, template: str, *, hub_model_id: str | None, license: str = "other",
                     base_model: str | None = None, dataset: str | None = None, class_conditional: bool = False,
                     **fields: object) -> Path:
    """Fill ``model_cards/<template>.md`` and the shared sections (``$name`` placeholders), put the metadata on top,
    check it parses, and write it as ``output_dir/README.md``.

    ``base_model`` and ``dataset`` go into the metadata when they are Hub ids; a local one is named in the text
    by its folder name only. A placeholder without a value is an error, so a card never ships with a hole in it.
    """
    output_dir = Path(output_dir)
    folder = resources.files("medsyn.model_cards")
    text = folder.joinpath(f"{template}.md").read_text() + folder.joinpath("responsible_use.md").read_text()
    base_id = hub_id(base_model)
    base_text = f"`{base_id}`" if base_id else f"`{Path(str(base_model)).name}` (a local folder, not on the Hub)"
    data_text = str(fields.get("data_description", ""))
    values = {
        "repo_id": card_repo_id(hub_model_id, output_dir),
        "base_model": base_text if base_model else "",
        "base_model_id": base_id or (f"path/to/{Path(str(base_model)).name}" if base_model else ""),
        "license_text": f"`{license}`." if license != "other" else (
            f"The weights carry the terms of their training data ({data_text}); pass `--license` when those terms "
            "are known. medsyn's code is Apache-2.0."),
        "citation": "\n".join(f"- {entry}" for entry in CITATIONS[template]),
        **{key: str(value) for key, value in fields.items()},
    }
    try:
        body = string.Template(text).substitute(values)
    except KeyError as error:
        raise ValueError(f"model card template {template!r} needs a value for {error.args[0]!r}") from error
    card = ModelCard(f"---\n{card_metadata(template, license, base_model, dataset, class_conditional).to_yaml()}\n---\n\n{body}")
    path = output_dir / "README.md"
    write_text_atomically(path, str(card))
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
        lines.append(f"| {name} FID, generated vs half the real set (real half vs real half), "
                     f"{section['half_size']} images each | {_number(section['half_size_fid'])} "
                     f"({_number(section['real_halves_fid'])}) |")
        lines.append(f"| {name} FID on all images (not comparable with the row above: FID falls as images are "
                     f"added) | {_number(section['fid'])} |")
        lines.append(f"| {name} precision / recall / density / coverage | " + " / ".join(
            _number(section[k]) for k in ("precision", "recall", "density", "coverage")) + " |")
    diversity = metrics["diversity"]["overall"]
    lines.append(f"| mean pairwise MS-SSIM, generated (real) | {_number(diversity['generated'])} "
                 f"({_number(diversity['real'])}) |")
    audit = metrics["privacy"].get("images")
    if audit is None:
        lines.append(f"| memorisation audit | {metrics['privacy']['note']} |")
    else:
        lines.append(f"| memorisation audit ({audit['space']}), {audit['num_generated']} images | {audit['verdict']}; "
                     f"{audit['num_near_copies']} near-copies, {audit['num_flagged']} flagged, closest "
                     f"{_number(audit['min_distance'])}, data-copying Z_U {_number(audit['data_copying_z'])} |")
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
    if EVALUATION_HEADING not in text:
        write_text_atomically(path, text.rstrip("\n") + "\n\n" + evaluation_markdown(metrics))
        return path
    before, _, after = text.partition(EVALUATION_HEADING)
    rest = after.split("\n## ", 1)
    write_text_atomically(path, before + evaluation_markdown(metrics) + ("\n## " + rest[1] if len(rest) > 1 else ""))
    return path
