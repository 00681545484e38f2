"""Image sets to feature vectors, in batches, once per set: every feature metric reads the same features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def extract_features(
    images: torch.Tensor,
    encoder: nn.Module,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
    description: str = "features",
) -> torch.Tensor:
    """Features (N, D) float32 on the CPU of uint8 images (N, C, H, W).

    The encoder gets uint8 batches when its ``input_dtype`` is ``torch.uint8`` (the FID Inception), else
    float batches in [0, 1].
    """
    if images.ndim != 4 or images.dtype != torch.uint8 or len(images) == 0:
        raise ValueError(f"expected a non-empty uint8 stack (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = encoder.to(device).eval()
    takes_uint8 = getattr(encoder, "input_dtype", None) == torch.uint8
    batches = images.split(batch_size)
    outputs = []
    for batch in tqdm(batches, desc=description, disable=not progress):
        batch = batch.to(device)
        features = encoder(batch if takes_uint8 else batch.float() / 255.0)
        outputs.append(features.reshape(len(batch), -1).float().cpu())
    features = torch.cat(outputs)
    if not torch.isfinite(features).all():
        raise ValueError(f"{description}: the encoder returned NaN or Inf features")
    return features


def _saved_processor(path: str):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):
        return None


class PooledImageEncoder(nn.Module):
    """A transformers vision backbone (e.g. a ResNet expert classifier) as a domain feature encoder.

    Returns the pooled output: the features a classifier of medical images looks at, which separate
    grayscale scans better than ImageNet Inception's. Inputs in [0, 1] are resized to ``image_size`` (the side the
    model was trained at, when known: a classifier's features at another scale are not the ones it learned),
    normalised as the model's image processor says (when it has one) and grayscale is repeated to the channels the
    model expects.
    """

    def __init__(self, backbone: nn.Module, mean: list[float] | None = None, std: list[float] | None = None,
                 image_size: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.image_size = image_size
        channels = getattr(backbone.config, "num_channels", 3)
        shape = (1, channels, 1, 1)
        self.register_buffer("mean", torch.tensor(mean or [0.0] * channels).reshape(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std or [1.0] * channels).reshape(shape), persistent=False)

    @classmethod
    def for_saved_model(cls, backbone: nn.Module, path: str) -> PooledImageEncoder:
        """``backbone`` as the model saved at ``path`` was trained to see images: the mean and std of its image
        processor (when it has one), at its side (the config's ``image_size``, else the processor's square size or
        shortest edge; unknown when neither says). The processor is read once."""
        processor = _saved_processor(path)
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        size = getattr(backbone.config, "image_size", None)
        if not isinstance(size, int):
            processor_size = getattr(processor, "size", None) or {}
            size = processor_size.get("height") or processor_size.get("shortest_edge")
        return cls(backbone, None if mean is None else list(mean), None if std is None else list(std), size)

    @classmethod
    def from_pretrained(cls, path: str) -> PooledImageEncoder:
        from transformers import AutoModel

        return cls.for_saved_model(AutoModel.from_pretrained(path), path)

    def resized(self, images: torch.Tensor) -> torch.Tensor:
        """Images at the model's side (bilinear), float; unchanged when it is unknown or already matches."""
        images = images.float()
        if self.image_size and images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return images

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] as the backbone expects them: its channel count, its mean and std."""
        channels = self.mean.shape[1]
        if images.shape[1] not in (1, channels):
            raise ValueError(f"the encoder takes {channels}-channel images, got {images.shape[1]} channels")
        return (images.expand(-1, channels, -1, -1) - self.mean) / self.std

    def feature_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The backbone's hidden states at every stage (for a perceptual loss), from images in [0, 1]."""
        return self.backbone(pixel_values=self.normalise(images), output_hidden_states=True).hidden_states

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=self.normalise(self.resized(images))).pooler_output.flatten(1)
