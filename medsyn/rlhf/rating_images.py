"""The generated images an expert rates, with the prompt each was made for, from ``medsyn generate``'s output, and
the rated samples the selector and policy learn from.

An ``.npz`` as ``medsyn generate --format npz`` writes it (``images``; the prompt from ``captions``, else the class
name from ``labels`` and ``class_names``), or an image folder or manifest as the data loader reads it (the prompt
from its caption column or the class). Each image is known by its pixel digest, so ratings follow the image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medsyn.rlhf.ratings import MAX_PROMPT_CHARACTERS, Aspect, RatingsFile, image_digest


@dataclass(frozen=True)
class ImageToRate:
    pixels: np.ndarray  # uint8 (H, W) or (H, W, 3)
    prompt: str
    source: str
    digest: str

    def png(self) -> bytes:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(self.pixels).save(buffer, format="PNG")
        return buffer.getvalue()


def _npz_prompts(data, count: int, path: Path) -> list[str]:
    if "captions" in data.files:
        return [str(c) for c in data["captions"]]
    if "labels" in data.files and "class_names" in data.files and len(data["class_names"]):
        names, labels = [str(n) for n in data["class_names"]], data["labels"]
        if labels.min() < 0 or labels.max() >= len(names):
            raise ValueError(f"{path}: labels outside class_names {names}")
        return [names[int(label)] for label in labels]
    return [""] * count


def load_images_to_rate(source: str | Path) -> list[ImageToRate]:
    """The images in ``source`` (an ``.npz``, image folder or manifest), in order; errors name what is wrong."""
    path = Path(source)
    if not path.exists():
        raise ValueError(f"--images {path}: no such file or folder")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data.files:
                raise ValueError(f"--images {path}: the .npz has no 'images' array (arrays: {data.files})")
            images = data["images"]
            prompts = _npz_prompts(data, len(images), path)
        layout_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))
        if images.dtype != np.uint8 or not layout_ok:
            raise ValueError(f"--images {path}: expected uint8 images (N, H, W) or (N, H, W, 1 or 3), got "
                             f"{images.dtype} {images.shape}")
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        sources = [f"{path.name}[{i}]" for i in range(len(images))]
    else:
        from medsyn.data import load_image_dataset

        dataset = load_image_dataset(path)
        images = [np.asarray(image) for image in dataset["image"]]
        prompts, sources = list(dataset["caption"]), list(dataset["source"])
    if len(images) == 0:
        raise ValueError(f"--images {path}: no images")
    if len(prompts) != len(images):
        raise ValueError(f"--images {path}: {len(prompts)} prompts for {len(images)} images")
    too_long = next((i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARACTERS), None)
    if too_long is not None:
        raise ValueError(f"--images {path}: the prompt of image {too_long} has {len(prompts[too_long])} characters; "
                         f"at most {MAX_PROMPT_CHARACTERS}")
    return [ImageToRate(pixels, prompt, source, image_digest(pixels))
            for pixels, prompt, source in zip(images, prompts, sources)]


def rated_samples(images_path: str | Path, ratings_path: str | Path, aspect: Aspect | str,
                  resolution: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """(images (N, C, H, W) in [0, 1], ratings 1-3, image digests, prompts): one row per rating of ``aspect`` in the
    ratings file, its image found by digest among ``images_path``; ``resolution`` resizes (bilinear)."""
    images = {image.digest: image for image in load_images_to_rate(images_path)}
    ratings = [r for r in RatingsFile(ratings_path).ratings() if r.aspect == Aspect(aspect)]
    if not ratings:
        raise ValueError(f"--ratings {ratings_path}: no {Aspect(aspect).value} ratings")
    unknown = [r for r in ratings if r.image not in images]
    if unknown:
        raise ValueError(f"--ratings: {len(unknown)} of {len(ratings)} ratings name images that are not in --images "
                         f"{images_path} (the first was rated at {unknown[0].path or unknown[0].image})")
    pixels = torch.stack([torch.from_numpy(np.atleast_3d(images[r.image].pixels)).permute(2, 0, 1) for r in ratings])
    pixels = pixels.float() / 255.0
    if resolution and pixels.shape[-1] != resolution:
        pixels = F.interpolate(pixels, size=(resolution,) * 2, mode="bilinear", antialias=True, align_corners=False)
    return pixels, torch.tensor([r.rating for r in ratings]), [r.image for r in ratings], [r.prompt for r in ratings]


def split_by_image(digests: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (training, held out), holding out ``fraction`` of the distinct images with all their ratings."""
    distinct = sorted(set(digests))
    held_out_count = max(1, round(fraction * len(distinct)))
    if held_out_count >= len(distinct):
        raise ValueError(f"{len(distinct)} rated images are too few to hold out {held_out_count}")
    held_out = set(np.random.default_rng(seed).permutation(distinct)[:held_out_count])
    rows = np.arange(len(digests))
    mask = np.array([d in held_out for d in digests])
    return rows[~mask], rows[mask]


def add_rated_data_arguments(parser):
    """The flags naming the rated pool: the ratings file, the images, their resolution and the held-out share."""
    from medsyn.training.script_args import add_validation_fraction_argument
    from medsyn.validation import count_argument

    data = parser.add_argument_group("ratings")
    data.add_argument("--ratings", type=str, required=True, help="The ratings file medsyn rate wrote (JSON lines).")
    data.add_argument("--images", type=str, required=True,
                      help="The rated images: medsyn generate's samples.npz, an image folder or a manifest.")
    data.add_argument("--resolution", type=count_argument(), default=None,
                      help="Side the images are resized to; default: their own (a multiple of --patch_size).")
    add_validation_fraction_argument(parser, default=0.2)
    return data
