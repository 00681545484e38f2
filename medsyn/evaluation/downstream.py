"""Downstream utility: does adding synthetic images help a classifier of real ones?

The same small ResNet (a transformers config, fixed seed, fixed schedule) is trained twice: on the real
training images alone, and on them plus the synthetic images. Both are scored by ROC AUC on held-out real test
images, with bootstrap confidence intervals over the test set, and the paired difference (the same resamples
for both) says whether the synthetic data helped beyond resampling noise. This is the case study's
clinical-utility test.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .image_sets import ImageSet


def binarise(image_set: ImageSet, positive: list[str]) -> ImageSet:
    """Labels 1 for the ``positive`` classes and 0 for the rest (e.g. any tumour type vs no tumour)."""
    if image_set.labels is None or image_set.class_names is None:
        raise ValueError(f"--{image_set.name}: downstream evaluation needs labelled images")
    unknown = [name for name in positive if name not in image_set.class_names]
    if unknown:
        raise ValueError(f"--{image_set.name}: positive classes {unknown} not in its classes {image_set.class_names}")
    indices = [image_set.class_names.index(name) for name in positive]
    labels = np.isin(image_set.labels, indices).astype(np.int64)
    names = ["negative (" + ", ".join(n for n in image_set.class_names if n not in positive) + ")",
             "positive (" + ", ".join(positive) + ")"]
    return ImageSet(image_set.name, image_set.images, labels, names, image_set.source)


def _classifier(channels: int, num_labels: int, seed: int):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=channels, embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                          depths=[1, 1, 1, 1], layer_type="basic", num_labels=num_labels)
    return ResNetForImageClassification(config)


def _prepare(images: torch.Tensor, resolution: int | None) -> torch.Tensor:
    x = images.float() / 255.0
    if resolution is not None and resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="area" if resolution < x.shape[-1] else "bilinear")
    return (x - 0.5) / 0.5


def train_classifier(images: torch.Tensor, labels: np.ndarray, num_labels: int, steps: int, batch_size: int,
                     learning_rate: float, seed: int, progress: bool, description: str,
                     augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None):
    """A seeded small ResNet trained for a fixed number of steps (AdamW, one-cycle); returns it in eval mode.

    Steps, not epochs: with and without synthetic images the classifier gets the same compute, so a gain
    comes from the data, not from longer training. ``augment(batch, generator)`` transforms each batch on the
    fly, with a generator of its own, so the batches drawn are the same with and without it.
    """
    model = _classifier(images.shape[1], num_labels, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    augmentation_generator = torch.Generator().manual_seed(seed + 1)
    targets = torch.as_tensor(labels)
    model.train()
    for _ in tqdm(range(steps), desc=description, disable=not progress):
        batch = torch.randint(len(images), (batch_size,), generator=generator)
        pixels = images[batch] if augment is None else augment(images[batch], augmentation_generator)
        loss = model(pixel_values=pixels, labels=targets[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def predict_scores(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    probabilities = torch.cat([model(pixel_values=images[i : i + batch_size]).logits.softmax(-1)
                               for i in range(0, len(images), batch_size)])
    return probabilities[:, 1] if probabilities.shape[1] == 2 else probabilities


def roc_auc(scores: torch.Tensor, labels: torch.Tensor, num_labels: int) -> float:
    """Binary ROC AUC, or the macro one-vs-rest AUC for more classes (torchmetrics)."""
    from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

    if num_labels == 2:
        return float(binary_auroc(scores, labels))
    return float(multiclass_auroc(scores, labels, num_classes=num_labels, average="macro"))


def bootstrap_aucs(scores: list[torch.Tensor], labels: torch.Tensor, num_labels: int, resamples: int,
                   seed: int) -> np.ndarray:
    """(resamples, len(scores)) AUCs on test sets resampled with replacement, the same resamples for each model."""
    missing = sorted(set(range(num_labels)) - set(labels.unique().tolist()))
    if missing:
        raise ValueError(f"the test set has no image of class {missing}: AUC needs every class present")
    rng = np.random.default_rng(seed)
    rows, attempts = [], 0
    while len(rows) < resamples:
        attempts += 1
        if attempts > 20 * resamples:
            raise ValueError(f"a class is so rare in the test set ({len(labels)} images) that resamples keep missing "
                             "it: add test images of every class")
        index = torch.as_tensor(rng.integers(0, len(labels), len(labels)))
        if len(labels[index].unique()) < num_labels:
            continue  # AUC needs every class present
        rows.append([roc_auc(s[index], labels[index], num_labels) for s in scores])
    return np.array(rows)


def downstream_utility(
    train: ImageSet,
    test: ImageSet,
    synthetic: ImageSet,
    resolution: int | None = None,
    steps: int = 500,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    resamples: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Test AUC of a classifier trained on ``train`` and on ``train`` + ``synthetic``, with 95% bootstrap CIs."""
    for image_set in (train, test, synthetic):
        if image_set.labels is None or image_set.class_names is None:
            raise ValueError(f"--{image_set.name}: downstream evaluation needs labelled images")
    if not train.class_names == test.class_names == synthetic.class_names:
        raise ValueError(
            f"class names differ: train {train.class_names}, test {test.class_names}, generated "
            f"{synthetic.class_names}; pass --downstream-positive to compare positive vs negative classes"
        )
    num_labels = len(train.class_names)
    test_images, test_labels = _prepare(test.images, resolution), torch.as_tensor(test.labels)
    runs = {
        "real": (train.images, train.labels),
        "real + synthetic": (torch.cat([train.images, synthetic.images]),
                             np.concatenate([train.labels, synthetic.labels])),
    }
    scores, result = [], {}
    for name, (images, labels) in runs.items():
        model = train_classifier(_prepare(images, resolution), labels, num_labels, steps, batch_size,
                                 learning_rate, seed, progress, f"downstream classifier ({name})")
        scores.append(predict_scores(model, test_images))
        result[name] = {"auc": roc_auc(scores[-1], test_labels, num_labels), "train_images": len(images)}
    boot = bootstrap_aucs(scores, test_labels, num_labels, resamples, seed)
    for column, name in enumerate(runs):
        result[name]["auc_ci"] = np.percentile(boot[:, column], [2.5, 97.5]).tolist()
    difference = boot[:, 1] - boot[:, 0]
    return {
        "description": (
            f"A small ResNet trained {steps} steps of {batch_size} images (seed {seed}"
            + (f", {resolution} px" if resolution else "")
            + f") on the real training images, then on them plus the synthetic ones; ROC AUC on {len(test)} "
            f"held-out real test images ({'binary' if num_labels == 2 else 'macro one-vs-rest'}), "
            f"95% CIs from {resamples} bootstrap resamples of the test set."
        ),
        "class_names": train.class_names,
        "runs": result,
        "auc_gain": result["real + synthetic"]["auc"] - result["real"]["auc"],
        "auc_gain_ci": np.percentile(difference, [2.5, 97.5]).tolist(),
    }
