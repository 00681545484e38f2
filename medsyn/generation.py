"""Generating images from any saved medsyn pipeline, one rule for ``medsyn generate`` and ``medsyn serve``.

Image i of a request with seed s is drawn from its own generator keyed by (s, i), and its class label or prompt
travels with it: a batch may mix images of several requests (the service batches compatible jobs) and still give
every image exactly what the command line gives it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

from medsyn.schedulers.samplers import Sampler
from medsyn.seeding import keyed_generator


class ModelKind(StrEnum):
    SCORE = "score"  # ScoreLangevinPipeline: by class, any sampler
    DDPM = "ddpm"  # ClassConditionalDDPMPipeline: by class
    MEDISYN = "medisyn"  # MediSynPipeline: by prompt


def model_kind(pipe) -> ModelKind:
    from medsyn.pipelines import ClassConditionalDDPMPipeline, MediSynPipeline

    if isinstance(pipe, MediSynPipeline):
        return ModelKind.MEDISYN
    return ModelKind.DDPM if isinstance(pipe, ClassConditionalDDPMPipeline) else ModelKind.SCORE


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample, shared by every image of a batch; None means the pipeline's default."""

    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    n_steps_each: int | None = None
    sampler: Sampler = Sampler.LANGEVIN
    bf16: bool = False


@dataclass(frozen=True)
class ImageKey:
    """One image to draw: its request's seed and its index there, and what it is conditioned on."""

    seed: int
    index: int
    class_label: int | None = None
    prompt: str | None = None
    negative_prompt: str | None = None


def _as_flag(name: str) -> str:
    return name


def check_sampling(pipe, settings: SamplingSettings, *, prompt: bool, negative_prompt: bool,
                   flag: Callable[[str], str] = _as_flag) -> None:
    """Refuse settings the model cannot use, naming the argument (``flag`` spells the names: ``--n-steps-each``
    on the command line, ``n_steps_each`` in the service)."""
    kind = model_kind(pipe)
    score_only = [("n_steps_each", settings.n_steps_each),
                  ("sampler", None if settings.sampler == Sampler.LANGEVIN else settings.sampler)]
    if kind is ModelKind.MEDISYN:
        if not prompt:
            raise ValueError(f"this is a text-guided MediSyn model: pass {flag('prompt')}")
        score_only.append(("bf16", settings.bf16 or None))
    elif prompt or negative_prompt:
        what = "class-conditional DDPM" if kind is ModelKind.DDPM else "class-conditional score model"
        raise ValueError(f"this is a {what}: pass {flag('class_label')}, not {flag('prompt')}")
    if kind is not ModelKind.SCORE:
        for name, value in score_only:
            if value is not None:
                raise ValueError(f"{flag(name)} applies to score-Langevin models only")
    if kind is ModelKind.MEDISYN:
        return
    guidance = pipe.guidance_default if settings.guidance_scale is None else settings.guidance_scale
    if kind is ModelKind.DDPM:
        pipe.check_inputs(1, settings.num_inference_steps, guidance, "np", None)
    elif kind is ModelKind.SCORE:
        pipe.check_inputs(1, settings.num_inference_steps, settings.n_steps_each, None, guidance, "np", None)


def sample_images(pipe, keys: Sequence[ImageKey], settings: SamplingSettings, callback_on_step_end=None) -> np.ndarray:
    """The images of ``keys`` as float arrays (B, H, W, C) in [0, 1], non-finite values left in for the caller to
    see; ``callback_on_step_end`` is passed to the pipeline (raise in it to abandon the batch). A score pipeline
    must already hold the scheduler of ``settings.sampler`` (``sampler_scheduler``)."""
    kind = model_kind(pipe)
    generators = [keyed_generator(key.seed, key.index) for key in keys]
    options = {"callback_on_step_end": callback_on_step_end} if callback_on_step_end is not None else {}
    if kind is ModelKind.MEDISYN:
        if settings.guidance_scale is not None:
            options["guidance_scale"] = settings.guidance_scale
        if settings.num_inference_steps is not None:
            options["num_inference_steps"] = settings.num_inference_steps
        negatives = [key.negative_prompt for key in keys]
        if any(n is not None for n in negatives):
            options["negative_prompt"] = [n or "" for n in negatives]
        return pipe([key.prompt for key in keys], generator=generators, output_type="np", **options).images
    if kind is ModelKind.SCORE:
        options["n_steps_each"] = settings.n_steps_each
    labels = [key.class_label for key in keys]
    return pipe(
        batch_size=len(keys),
        class_labels=None if all(label is None for label in labels) else labels,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,  # None: the model's saved default
        generator=generators,
        output_type="np",
        autocast_dtype=torch.bfloat16 if settings.bf16 else None,
        **options,
    ).images


def sample_image_set(pipe, keys: Sequence[ImageKey], settings: SamplingSettings, batch_size: int) -> np.ndarray:
    """The images of ``keys``, ``batch_size`` at a time, as an image set's uint8 array: (N, H, W) for grayscale,
    (N, H, W, C) for colour."""
    images = np.concatenate([to_uint8(sample_images(pipe, keys[s : s + batch_size], settings))
                             for s in range(0, len(keys), batch_size)])
    return images[..., 0] if images.shape[-1] == 1 else images


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats as 8-bit grey levels, in the same layout (NaN as 0)."""
    return np.round(np.nan_to_num(images) * 255).clip(0, 255).astype(np.uint8)
