"""A model the service has loaded: the pipeline, what it makes, its version and its QA gate."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medsyn.generation import ModelKind, model_kind
from medsyn.serving.quality_gate import QualityGate

CARD_SUMMARY_CHARACTERS = 400


def model_version(pipe) -> str:
    """The first 16 hex digits of a SHA-256 over every component's config and weights: the same files give the
    same version wherever they were loaded from, and any retraining or fine-tuning changes it."""
    digest = hashlib.sha256()
    for name, component in sorted(pipe.components.items()):
        digest.update(name.encode())
        config = getattr(component, "config", None)
        if config is not None:
            digest.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
        if isinstance(component, torch.nn.Module):
            for key, tensor in sorted(component.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def card_summary(source: str) -> str | None:
    """The first paragraph of the model card's text (after its metadata block), when the folder has one."""
    card = Path(source) / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8")
    if text.startswith("---"):
        text = text.split("---", 2)[-1]
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip() and not p.strip().startswith("#")]
    return paragraphs[0][:CARD_SUMMARY_CHARACTERS] if paragraphs else None


def image_shape(pipe) -> tuple[int, int, int]:
    """(height, width, channels) of the images the pipeline makes by default."""
    if model_kind(pipe) is ModelKind.MEDISYN:
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return size, size, pipe.vae.config.in_channels
    size = pipe.unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    return height, width, pipe.unet.config.in_channels


@dataclass
class ServedModel:
    name: str
    source: str
    pipe: object
    kind: ModelKind
    version: str
    image_shape: tuple[int, int, int]
    load_seconds: float
    card_summary: str | None = None
    gate: QualityGate | None = None

    @property
    def class_names(self) -> list[str] | None:
        return None if self.kind is ModelKind.MEDISYN else self.pipe.class_names

    @classmethod
    def load(cls, name: str, source: str, device: str | torch.device = "cpu", gate: QualityGate | None = None
             ) -> ServedModel:
        from medsyn.pipelines import load_pipeline

        started = time.perf_counter()
        pipe = load_pipeline(source)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        shape = image_shape(pipe)
        if gate is not None and gate.image_shape != shape:
            raise ValueError(f"--train-index {name}: the index holds {gate.image_shape} (H, W, C) images, the model "
                             f"makes {shape}")
        return cls(name, source, pipe, model_kind(pipe), model_version(pipe), shape, time.perf_counter() - started,
                   card_summary(source), gate)

    def summary(self) -> dict:
        return {
            "name": self.name, "kind": self.kind.value, "source": self.source, "version": self.version,
            "class_names": self.class_names, "image_shape": list(self.image_shape),
            "quality_index": self.gate is not None, "load_seconds": round(self.load_seconds, 3),
            "card_summary": self.card_summary,
        }
