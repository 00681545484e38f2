"""The selector (reward) model of MINIM's RLHF: an image classifier that predicts an image's normalised expert
rating, and the accept threshold learned from the ratings.

The paper's selector is a ViT with 16x16 patches, 768-d tokens, 12 heads and 6 layers (``SELECTOR_ARCHITECTURE``);
tests shrink it. Any transformers image-classification model with one output will do (``ViTForImageClassification``
by default; a CNN such as a classifier trained on the labelled scans, with a new one-output head, learns far more
from a few hundred ratings: RESULTS.md, issue 15): ``sigmoid(logit)`` is the predicted rating on [0, 1]
(1 -> 0, 2 -> 0.5, 3 -> 1), trained with binary cross-entropy against the normalised ratings, so that it can be saved,
shared and loaded like any transformers model. The accept threshold, saved in its config, is the score that best
separates images rated 3 from the rest (balanced accuracy on the ratings).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.functional import spearman_corrcoef
from transformers import AutoModelForImageClassification, PreTrainedModel, ViTConfig

from medsyn.rlhf.fitting import fit_on_minibatches
from medsyn.rlhf.ratings import RATING_SCALE, normalised

SELECTOR_ARCHITECTURE = dict(patch_size=16, hidden_size=768, num_attention_heads=12, num_hidden_layers=6,
                             intermediate_size=3072)


def selector_config(image_size: int, channels: int, **overrides) -> ViTConfig:
    """The paper's selector shape for ``channels``-channel images of side ``image_size``, with ``overrides``."""
    settings = {**SELECTOR_ARCHITECTURE, **overrides}
    if image_size % settings["patch_size"]:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {settings['patch_size']}")
    return ViTConfig(image_size=image_size, num_channels=channels, num_labels=1, **settings)


def load_selector(folder: str, images: torch.Tensor | None = None, new_head: bool = False) -> PreTrainedModel:
    """A selector from a transformers image-classification folder: a saved selector, or with ``new_head`` any trained
    classifier (e.g. train_expert.py's) whose head is replaced by a fresh one-output one. With ``images`` (N, C, H, W),
    checks that the model takes them."""
    if new_head:
        model = AutoModelForImageClassification.from_pretrained(folder, num_labels=1, ignore_mismatched_sizes=True)
        model.config.selector_backbone = Path(folder).name  # saved with it: the card names it in every later round
    else:
        model = AutoModelForImageClassification.from_pretrained(folder)
    if model.config.num_labels != 1:
        raise ValueError(f"{folder}: a selector has one output, this classifier has {model.config.num_labels}; pass "
                         "it as a backbone (a new one-output head) instead")
    if images is not None:
        channels, size = images.shape[1], images.shape[-1]
        fixed_size = getattr(model.config, "image_size", size) if model.config.model_type == "vit" else size
        if (model.config.num_channels, fixed_size) != (channels, size):
            raise ValueError(f"{folder} takes {model.config.num_channels}-channel images"
                             + (f" of {fixed_size} px" if model.config.model_type == "vit" else "")
                             + f"; the rated images are {channels}-channel {size} px")
    return model


def _logits(model: PreTrainedModel, images: torch.Tensor) -> torch.Tensor:
    """The selector's logit per image (N,) of images (N, C, H, W) in [0, 1] (uint8 is divided by 255)."""
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return model(pixel_values=images * 2 - 1).logits[:, 0]


@torch.no_grad()
def selector_scores(model: PreTrainedModel, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Predicted ratings on [0, 1] (N,), on the CPU, of images (N, C, H, W) in [0, 1] (uint8 is divided by 255),
    ``batch_size`` at a time on the model's device."""
    device = next(model.parameters()).device
    return torch.cat([torch.sigmoid(_logits(model, batch.to(device))).cpu() for batch in images.split(batch_size)])


def selector_loss(model: PreTrainedModel, images: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the predicted rating against the normalised 1-3 ``ratings`` of images in [0, 1]."""
    if not torch.isin(ratings.cpu(), torch.tensor(RATING_SCALE)).all():
        raise ValueError(f"ratings must be in {list(RATING_SCALE)}, got {sorted(set(ratings.tolist()))}")
    logits = _logits(model, images)
    return F.binary_cross_entropy_with_logits(logits.float(), normalised(ratings.float()).to(logits.device))


def fit_selector(model: PreTrainedModel, images: torch.Tensor, ratings: torch.Tensor, steps: int,
                 learning_rate: float = 3e-4, batch_size: int = 32, seed: int = 0) -> list[float]:
    """Train ``model`` to predict the normalised ``ratings`` (1-3) of ``images``; the per-step losses.

    Batches are drawn with a seeded generator, so a run repeats exactly.
    """
    ratings = torch.as_tensor(ratings)
    if len(images) != len(ratings) or len(images) == 0:
        raise ValueError(f"{len(images)} images for {len(ratings)} ratings")

    def batch_loss(rows, generator):
        loss = selector_loss(model, images[rows], ratings[rows])
        return loss, loss.item()

    return fit_on_minibatches(model, len(images), steps, batch_loss, learning_rate, batch_size, seed)


def accept_threshold(scores: torch.Tensor, ratings: torch.Tensor) -> float:
    """The score that best separates top-rated images (3) from the rest: the midpoint between consecutive sorted
    scores with the highest balanced accuracy of ``score >= threshold`` as "rated 3"."""
    scores, ratings = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(ratings)
    good = ratings == RATING_SCALE[-1]
    if good.all() or not good.any():
        raise ValueError("an accept threshold needs images rated 3 and images rated lower")
    values = scores.unique()
    candidates = torch.cat([values[:1] - 1e-6, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-6])
    accepted = scores[None, :] >= candidates[:, None]
    balanced = (accepted[:, good].double().mean(1) + (~accepted[:, ~good]).double().mean(1)) / 2
    return float(candidates[balanced.argmax()])


def selector_metrics(scores: torch.Tensor, ratings: torch.Tensor, threshold: float | None = None) -> dict:
    """Held-out rating accuracy (the nearest rating to each score), Spearman correlation and, with a threshold, the
    accept decision's accuracy on "rated 3"."""
    scores, ratings = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(ratings)
    low, high = RATING_SCALE[0], RATING_SCALE[-1]
    predicted = (scores * (high - low)).round() + low
    metrics = {"rating_accuracy": float((predicted == ratings).double().mean()),
               "spearman": float(spearman_corrcoef(scores.float(), ratings.float())), "count": len(ratings)}
    if threshold is not None:
        metrics["accept_accuracy"] = float(((scores >= threshold) == (ratings == high)).double().mean())
    return metrics
