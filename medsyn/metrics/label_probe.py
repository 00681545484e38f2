"""A quick check that generated images look like their class: a small CNN trained on real images judges them.

Two numbers come out. *Class agreement*: the share of generated images that the probe, trained on real
images only, assigns to the class they were generated for (real held-out images give its ceiling).
*Probe Fréchet distance*: the FID formula on the probe's pooled features, against held-out real images;
two real sets give its floor. It is no substitute for FID on a standard network (``medsyn evaluate``);
it is cheap enough to run at the end of ``medsyn demo`` on a CPU, and its features are specific to the
images at hand (a small "domain FID").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medsyn.seeding import keyed_generator

from .feature_distances import frechet_distance


class LabelProbe(nn.Module):
    """Three conv stages, global average pooling, a linear classifier; ~25k parameters."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        stages = []
        for c_in, c_out in ((in_channels, width), (width, 2 * width), (2 * width, 4 * width)):
            stages += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.SiLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def as_probe_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C), or float in [0, 1], to float (N, C, H, W) in [-1, 1]."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"expected images (N, H, W) or (N, H, W, C), got shape {images.shape}")
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    tensor = torch.from_numpy(images.astype(np.float32) / scale).permute(0, 3, 1, 2)
    if not torch.isfinite(tensor).all():
        raise ValueError("images contain NaN or Inf")
    return tensor * 2 - 1


def fit_label_probe(
    images: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int = 8, batch_size: int = 64, seed: int = 0
) -> LabelProbe:
    """Train a LabelProbe on real images (uint8 or [0, 1] floats) with their integer labels."""
    x, y = as_probe_input(images), torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {y.min().item()}..{y.max().item()}")
    torch.manual_seed(seed)
    probe = LabelProbe(x.shape[1], num_classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=3e-3)
    # One-cycle: warm-up then decay; a constant rate leaves the probe noticeably less accurate in few epochs.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * -(-len(x) // batch_size))
    probe.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=keyed_generator(seed, epoch))
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(probe(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return probe.eval()


@torch.no_grad()
def probe_outputs(probe: LabelProbe, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The probe's predicted class and pooled features for each image."""
    x = as_probe_input(images)
    features = torch.cat([probe.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    return probe.classifier(features).argmax(1).numpy(), features.double().numpy()


@dataclass
class LabelProbeReport:
    """What the probe says of one set of generated images, next to real held-out images."""

    class_agreement: dict[str, float]
    """Per class: share of generated images the probe assigns to their class."""
    real_class_agreement: dict[str, float]
    """The same on held-out real images: the probe's own accuracy, the ceiling for the above."""
    frechet_distance: float
    """Probe Fréchet distance, generated vs held-out real."""
    real_frechet_distance: float
    """Probe Fréchet distance, as many real images vs the same reference: the floor."""


def label_probe_report(
    probe: LabelProbe,
    generated: np.ndarray,
    generated_labels: np.ndarray,
    real: np.ndarray,
    real_labels: np.ndarray,
    class_names: list[str],
) -> LabelProbeReport:
    """Compare generated images with held-out real ones (not those the probe was trained on).

    The Fréchet distances use the same reference: the real images after the first ``len(generated)``, which
    serve as the same-sized real stand-in for the floor. So ``real`` needs at least twice as many images.
    """
    generated_labels, real_labels = np.asarray(generated_labels), np.asarray(real_labels)
    n = len(generated)
    if len(real) < 2 * n:
        raise ValueError(f"need at least {2 * n} real images to compare with {n} generated ones, got {len(real)}")
    if len(generated_labels) != n or len(real_labels) != len(real):
        raise ValueError("each image needs one label")

    def agreement(images, labels):
        predicted, features = probe_outputs(probe, images)
        return {name: float((predicted[labels == c] == c).mean()) for c, name in enumerate(class_names)
                if (labels == c).any()}, features

    fake_agreement, fake_features = agreement(generated, generated_labels)
    real_agreement, real_features = agreement(real, real_labels)
    stand_in, reference = real_features[:n], real_features[n:]
    return LabelProbeReport(
        class_agreement=fake_agreement,
        real_class_agreement=real_agreement,
        frechet_distance=frechet_distance(fake_features, reference),
        real_frechet_distance=frechet_distance(stand_in, reference),
    )
