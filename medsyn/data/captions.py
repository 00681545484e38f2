"""Captions from class labels: several phrasings per class, so a text-guided model learns the finding rather than
one string, and phrasings held out of training, to test whether it understood the words or memorised the strings.

A template file (``--caption_templates``) is JSON, given inline or as a path, in one of two forms::

    {"glioma": "brain MRI, axial slice, {label}", "notumor": ["axial brain MRI, no tumour", "normal brain MRI"]}
    {"train": {...the same mapping...}, "held_out": {"glioma": ["MR image of the brain showing a glioma"]}}

``{label}`` becomes the class name. Training draws one of the class's training phrasings per image and step;
``held_out`` phrasings are never trained on and must not repeat a training phrasing. ``BUNDLED_TEMPLATES`` names
the files that come with medsyn, for the brain MRI and fundus sets of ``../shared/data`` (modality, view and
finding; four training and one held-out phrasing per class).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SECTIONS = ("train", "held_out")
BUNDLED_TEMPLATES = {path.stem: path for path in sorted((Path(__file__).parent / "caption_templates").glob("*.json"))}
"""Template files shipped with medsyn, by name (``--caption_templates brain_tumor_mri``)."""


def template_source(value: str) -> str:
    """``--caption_templates``: a bundled template's name becomes its file; a path or inline JSON stays."""
    return str(BUNDLED_TEMPLATES[value]) if value in BUNDLED_TEMPLATES else value


def _phrasings(mapping: object, where: str) -> dict[str, list[str]]:
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{where}: need a non-empty mapping of class name -> caption(s), got {mapping!r}")
    out = {}
    for name, value in mapping.items():
        options = [value] if isinstance(value, str) else value
        if not isinstance(options, list) or not options or not all(isinstance(o, str) and o.strip() for o in options):
            raise ValueError(f"{where}: class {name!r} needs a caption or a non-empty list of non-empty captions, "
                             f"got {value!r}")
        out[str(name)] = [option.format(label=name) for option in options]
    return out


@dataclass
class CaptionTemplates:
    """Training and held-out phrasings per class name."""

    train: dict[str, list[str]]
    held_out: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, value: object) -> CaptionTemplates:
        """From the parsed JSON of a template file (either form in the module docstring)."""
        if isinstance(value, dict) and set(value) and set(value) <= set(SECTIONS):
            if "train" not in value:
                raise ValueError("caption templates: a file with a 'held_out' section needs a 'train' section too")
            held_out = value.get("held_out")
            templates = cls(_phrasings(value["train"], "caption templates 'train'"),
                            {} if held_out is None else _phrasings(held_out, "caption templates 'held_out'"))
        else:
            templates = cls(_phrasings(value, "caption templates"))
        for name, options in templates.held_out.items():
            leaked = sorted(set(options) & set(templates.train.get(name, [])))
            if leaked:
                raise ValueError(f"caption templates: held-out phrasings of {name!r} are also training phrasings: "
                                 f"{leaked}")
        return templates

    def check_classes(self, class_names: list[str]) -> None:
        missing = sorted(set(class_names) - set(self.train))
        if missing:
            raise ValueError(f"--caption_templates has no caption for the classes {missing} (it has "
                             f"{sorted(self.train)})")

    def training_phrasings(self) -> list[str]:
        """Every training phrasing once, class by class (a new tokenizer's vocabulary is learnt from them)."""
        return [option for options in self.train.values() for option in options]
