"""A model the service has loaded: the pipeline, what it makes, its version and its QA gate."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medsyn.generation import ModelKind, model_kind
from medsyn.schedulers.samplers import Sampler, sampler_scheduler
from medsyn.serving.quality_gate import QualityGate

CARD_SUMMARY_CHARACTERS = 400


def model_version(pipe) -> str:
    """The first 16 hex digits of a SHA-256 over every component's config (less bookkeeping such as
    ``_name_or_path``), weights, vocabulary and class names: the same model gives the same version wherever it was
    loaded from, and any retraining or fine-tuning changes it."""
    digest = hashlib.sha256()
    for name, component in sorted(pipe.components.items()):
        digest.update(name.encode())
        config = getattr(component, "config", None)
        if config is not None:  # diffusers' FrozenDict, or a transformers PretrainedConfig
            config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            kept = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
            digest.update(json.dumps(kept, sort_keys=True, default=str).encode())
        if hasattr(component, "get_vocab"):  # a tokenizer: its vocabulary decides what a prompt means
            digest.update(json.dumps(sorted(component.get_vocab().items())).encode())
        if isinstance(component, (list, dict, str)):  # class names: they decide what a label means
            digest.update(json.dumps(component, sort_keys=True).encode())
        if isinstance(component, torch.nn.Module):
            for key, tensor in sorted(component.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
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
    schedulers: dict[Sampler, object] = field(default_factory=dict)
    """A score model's scheduler per sampler, each built once from the trained one's sigma range."""

    def use_sampler(self, sampler: Sampler) -> None:
        """Give a score model's pipeline the scheduler of ``sampler`` (the trained one for Langevin)."""
        if self.kind is not ModelKind.SCORE:
            return
        if not self.schedulers:
            self.schedulers[Sampler.LANGEVIN] = self.pipe.scheduler
        if sampler not in self.schedulers:
            self.schedulers[sampler] = sampler_scheduler(sampler, self.schedulers[Sampler.LANGEVIN].config)
        self.pipe.scheduler = self.schedulers[sampler]

    @property
    def class_names(self) -> list[str] | None:
        return None if self.kind is ModelKind.MEDISYN else self.pipe.class_names

    @classmethod
    def load(cls, name: str, source: str, device: str | torch.device = "cpu", gate: QualityGate | None = None
             ) -> ServedModel:
        from medsyn.pipelines import (
            ClassConditionalDDPMPipeline,
            MediSynPipeline,
            ScoreLangevinPipeline,
            load_pipeline,
        )

        started = time.perf_counter()
        pipe = load_pipeline(source)
        if not isinstance(pipe, (ClassConditionalDDPMPipeline, MediSynPipeline, ScoreLangevinPipeline)):
            raise ValueError(f"--model {name}={source}: a {type(pipe).__name__}; medsyn serve serves medsyn's "
                             "score, DDPM and MediSyn pipelines")
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
            "name": self.name, "kind": self.kind.value, "version": self.version,  # no file path: it is the server's
            "class_names": self.class_names, "image_shape": list(self.image_shape),
            "quality_index": self.gate is not None,
            "quality_space": None if self.gate is None else self.gate.space.value,
            "load_seconds": round(self.load_seconds, 3),
            "card_summary": self.card_summary,
        }
