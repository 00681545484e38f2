"""Class labels and per-image generators, shared by medsyn's class-conditional pipelines.

A class-conditional unet has ``num_class_embeds = num_classes + 1`` embeddings; the last is the "null" class,
the unconditional prediction classifier-free guidance needs. Labels may be given by index or by name.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from medsyn.models.score_unet import null_class_label
from medsyn.validation import whole_number

ClassLabels = int | str | list[int | str] | torch.Tensor


class ClassConditionalMixin:
    """``class_names`` (saved in the config as ``{"0": name, ...}``), label encoding and one generator per image."""

    def register_class_names(self, class_names: list[str] | dict[str, str] | None) -> None:
        """Keep the names in the config as transformers' ``id2label``: a list in model_index.json is what
        diffusers' Hub download reads as a component."""
        if isinstance(class_names, dict):  # as saved: {"0": name, ...}
            class_names = [class_names[key] for key in sorted(class_names, key=int)]
        names = None if class_names is None else {str(i): name for i, name in enumerate(class_names)}
        self.register_to_config(class_names=names)

    @property
    def guidance_default(self) -> float:
        """The guidance the model was judged at when saved (``default_guidance_scale``), 1 (none) if not saved."""
        saved = self.config.get("default_guidance_scale")
        return 1.0 if saved is None else float(saved)

    @property
    def class_names(self) -> list[str] | None:
        """The names of the unet's classes, in index order."""
        names = self.config.class_names
        return None if names is None else [names[str(i)] for i in range(len(names))]

    @property
    def components(self) -> dict[str, Any]:
        """The modules and the class names: ``Pipeline(**pipe.components)`` is the same pipeline (diffusers leaves
        out every argument with a default, which dropped the names)."""
        return {**super().components, "class_names": self.class_names,
                "default_guidance_scale": self.config.get("default_guidance_scale")}

    def encode_class_labels(self, class_labels: ClassLabels | None, batch_size: int) -> torch.Tensor | None:
        """Class indices for ``batch_size`` images; the null class when the unet is conditional and none given."""
        null_label = null_class_label(self.unet)
        if class_labels is None:
            return None if null_label is None else torch.full((batch_size,), null_label, dtype=torch.long)
        if null_label is None:
            raise ValueError("class_labels were given but this unet is unconditional (num_class_embeds is None)")
        if torch.is_tensor(class_labels):
            class_labels = class_labels.tolist()
        if not isinstance(class_labels, (list, tuple)):
            class_labels = [class_labels] * batch_size
        names = self.class_names or []
        indices = []
        for label in class_labels:
            if isinstance(label, str):
                if label not in names:
                    raise ValueError(f"unknown class label {label!r}; this model knows {names}")
                label = names.index(label)
            label = whole_number(label, "class label", minimum=0)
            if label >= null_label:
                raise ValueError(f"class label {label} is out of range [0, {null_label})")
            indices.append(label)
        return torch.tensor(indices, dtype=torch.long)

    @staticmethod
    def prepare_generators(
        generator: torch.Generator | list[torch.Generator] | None, batch_size: int
    ) -> list[torch.Generator]:
        """One generator per image, so an image does not depend on how the batch is split into chunks.

        A list must have one per image; a single generator is the image's own for one image (so ``G`` and
        ``[G]`` give the same image, as in diffusers) and seeds the per-image ones in order for several.
        """
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(f"got {len(generator)} generators for {batch_size} images")
            return generator
        if isinstance(generator, torch.Generator) and batch_size == 1:
            return [generator]
        seeds = torch.randint(0, 2**63 - 1, (batch_size,), generator=generator).tolist()
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    def sample_shape(self, batch_size: int) -> tuple[int, ...]:
        """(batch, channels, height, width) of the unet's samples."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, *size)

    def prepare_latents(self, batch_size: int, generators: list[torch.Generator], latents: torch.Tensor | None,
                        noise_sigma: float) -> torch.Tensor:
        """Initial noise N(0, noise_sigma^2 I), one image per generator, or the caller's latents once checked."""
        shape = self.sample_shape(batch_size)
        if latents is None:
            return randn_tensor(shape, generator=generators, device=self.device) * noise_sigma
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or Inf")
        return latents.to(self.device, torch.float32)

    def guided_prediction(self, sample: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                          guidance_scale: float) -> torch.Tensor:
        """The unet's output, guided as u + w (c - u) when guidance is on (the same rule for scores, noise and v),
        in float32; the unet runs in its own dtype (a pipeline moved to bfloat16 included)."""
        if labels is None or guidance_scale == 1.0:
            return self.network_output(sample, t, labels)
        null = torch.full_like(labels, null_class_label(self.unet))
        both = self.network_output(torch.cat([sample, sample]), t, torch.cat([labels, null]))
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    def network_output(self, sample: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The unet's prediction at ``(sample, t)`` in float32 (the unet runs in its own dtype)."""
        return self.unet(sample.to(self.unet.dtype), t, class_labels=labels).sample.float()

    @staticmethod
    def to_output_type(samples: torch.Tensor, output_type: str, numpy_to_pil) -> Any:
        """Samples in [-1, 1] as "pt" (B, C, H, W), "np" (B, H, W, C) or PIL images, all in [0, 1]; "latent": the raw
        samples (B, C, H, W), in the model's own range and unclipped, as diffusers' pipelines return them."""
        if output_type == "latent":
            return samples
        image = (samples / 2 + 0.5).clamp(0, 1)
        if output_type in ("np", "pil"):
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = numpy_to_pil(image)
        return image
