"""Generation accuracy: does an expert classifier see, in each generated image, the class it was generated for?

Feature-aligned diffusion (Nair 2024) reports it with per-class SSIM diversity, averaged over seeds. Here every
image is drawn from a generator keyed by (seed, class, index), so two models evaluated with the same seeds start
from the same noise: their per-seed accuracies pair up, and the difference between models is measured with the
seed-to-seed spread of that difference rather than of each model alone.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import torch

from medsyn.metrics.diversity import mean_pairwise_ms_ssim
from medsyn.metrics.features import PooledImageEncoder
from medsyn.seeding import keyed_generator


class ExpertClassifier:
    """A saved image classifier (``train_expert.py``'s, or any transformers one) applied as it was trained: inputs
    resized to its resolution, normalised by its image processor, grayscale repeated to its channels."""

    def __init__(self, model: torch.nn.Module, encoder: PooledImageEncoder):
        self.model = model.eval()
        self.encoder = encoder
        self.class_names = [model.config.id2label[i] for i in range(model.config.num_labels)]

    @classmethod
    def from_pretrained(cls, path: str) -> ExpertClassifier:
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(path)
        return cls(model, PooledImageEncoder.for_saved_model(model, path))

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Class probabilities (N, classes) for images (N, C, H, W) in [0, 1]."""
        outputs = []
        for start in range(0, len(images), batch_size):
            batch = self.encoder.resized(images[start : start + batch_size])
            outputs.append(self.model(pixel_values=self.encoder.normalise(batch)).logits.float().softmax(1).cpu())
        return torch.cat(outputs)

    def predict(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Class indices for images (N, C, H, W) in [0, 1]."""
        return self.probabilities(images, batch_size).argmax(1)


def generate_class_images(
    pipeline: Any,
    class_name: str,
    generators: list[torch.Generator],
    prompt: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] of one class: by ``prompt`` for a text-guided pipeline, else by class label."""
    options: dict[str, Any] = {"generator": generators, "output_type": "pt"}
    if num_inference_steps is not None:
        options["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        options["guidance_scale"] = guidance_scale
    if prompt is not None:
        return pipeline(prompt, num_images_per_prompt=len(generators), **options).images.cpu()
    return pipeline(class_labels=[class_name] * len(generators), **options).images.cpu()


def generation_accuracy(
    pipeline: Any,
    expert: ExpertClassifier,
    per_class: int,
    seeds: list[int],
    prompts: dict[str, str] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    diversity_pairs: int = 200,
) -> dict:
    """Generation accuracy and per-class diversity of one model, per seed and averaged.

    Args:
        pipeline: a class-conditional pipeline (``class_labels`` by name, as ``ScoreLangevinPipeline``) or, with
            ``prompts``, a text-guided one (``MediSynPipeline``).
        expert: the judge; its class names are the classes generated.
        per_class: images per class and seed.
        seeds: one evaluation per seed; image i of class c under seed s depends only on (s, c, i).
        prompts: class name -> prompt, for a text-guided pipeline; must name every expert class.
        num_inference_steps, guidance_scale: passed to the pipeline when given.
        diversity_pairs: random pairs for each class's mean pairwise MS-SSIM (lower is more diverse).
    """
    names = expert.class_names
    if prompts is not None and set(names) - set(prompts):
        raise ValueError(f"prompts has no prompt for the expert's classes {sorted(set(names) - set(prompts))}")
    known = getattr(pipeline, "class_names", None)
    if prompts is None and known is not None and set(names) - set(known):
        raise ValueError(f"the model does not know the expert's classes {sorted(set(names) - set(known))} "
                         f"(it knows {known}); give prompts for a text-guided model")
    if per_class < 1 or not seeds:
        raise ValueError(f"need per_class >= 1 and at least one seed, got {per_class} and {seeds}")
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    accuracy_per_seed, diversity_per_seed = [], []
    for seed in seeds:
        correct, diversity = 0, {}
        for index, name in enumerate(names):
            generators = [keyed_generator(seed, index, i) for i in range(per_class)]
            images = generate_class_images(pipeline, name, generators, prompts[name] if prompts else None,
                                           num_inference_steps, guidance_scale)
            predicted = expert.predict(images).numpy()
            np.add.at(confusion[index], predicted, 1)
            correct += int((predicted == index).sum())
            if per_class >= 2:
                diversity[name] = mean_pairwise_ms_ssim(images, max_pairs=diversity_pairs, seed=seed)[0]
        accuracy_per_seed.append(correct / (per_class * len(names)))
        diversity_per_seed.append(diversity)
    return {
        "class_names": names,
        "seeds": list(seeds),
        "per_class": per_class,
        "accuracy_per_seed": accuracy_per_seed,
        "accuracy_mean": statistics.fmean(accuracy_per_seed),
        "accuracy_std": statistics.stdev(accuracy_per_seed) if len(seeds) > 1 else 0.0,
        "confusion_matrix": confusion.tolist(),
        "ms_ssim_per_class": {name: statistics.fmean(d[name] for d in diversity_per_seed)
                              for name in names if per_class >= 2},
    }


def paired_difference(baseline: dict, other: dict) -> dict:
    """Per-seed accuracy differences (other - baseline) of two evaluations run with the same seeds."""
    if baseline["seeds"] != other["seeds"] or baseline["per_class"] != other["per_class"]:
        raise ValueError("a paired comparison needs the same seeds and images per class for both models")
    differences = [b - a for a, b in zip(baseline["accuracy_per_seed"], other["accuracy_per_seed"])]
    return {
        "accuracy_difference_per_seed": differences,
        "accuracy_difference_mean": statistics.fmean(differences),
        "accuracy_difference_std": statistics.stdev(differences) if len(differences) > 1 else 0.0,
    }
