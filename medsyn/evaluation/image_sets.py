"""The image sets an evaluation compares, read from folders, manifests or NPZ files, optionally filtered.

A set is named on the command line as ``PATH`` or ``PATH:key=value[,key=value]``. For an ``.npz`` the keys are
its per-image arrays (``split=training``, ``tumor=1``, ``labels=0``); anywhere, ``part=K/N`` keeps every N-th
image starting at the K-th, so one real set can be split into interleaved halves (``part=1/2``, ``part=2/2``)
to see what the metrics give for two samples of the same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsyn.data.intensity import to_uint8


@dataclass
class ImageSet:
    """uint8 images (N, C, H, W) with optional integer labels indexing ``class_names``."""

    name: str
    images: torch.Tensor
    labels: np.ndarray | None
    class_names: list[str] | None
    source: str
    kept: np.ndarray | None = None
    """Indices of these images in the set they were sampled from (None: not a sample)."""

    def __len__(self) -> int:
        return len(self.images)

    def as_hwc(self) -> np.ndarray:
        """(N, H, W) for grayscale, (N, H, W, 3) for RGB: the layout PNG writers take."""
        array = self.images.permute(0, 2, 3, 1).numpy()
        return array[..., 0] if array.shape[-1] == 1 else array

    def subset(self, indices: np.ndarray) -> ImageSet:
        index = torch.as_tensor(indices, dtype=torch.long)
        labels = None if self.labels is None else self.labels[indices]
        return ImageSet(self.name, self.images[index], labels, self.class_names, self.source, np.asarray(indices))

    def resized(self, height: int, width: int) -> ImageSet:
        """The set at ``height`` x ``width``, resized as the training scripts resize (``image_transform``: bilinear
        with antialiasing on the uint8 pixels), so real images meet a model's samples at the model's resolution."""
        from torchvision.transforms import v2

        resize = v2.Resize((height, width), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        return ImageSet(self.name, resize(self.images), self.labels, self.class_names,
                        f"{self.source} (resized to {height}x{width})", self.kept)

    def labels_for_model(self, model_names: list[str] | None, required: bool = False) -> np.ndarray | None:
        """The labels as a model's class indices, matched by name; None when the set or the model has no
        classes (an error when ``required``, for a class-conditional model that cannot run without them)."""
        if self.labels is None or not self.class_names or not model_names:
            if required:
                raise ValueError(f"the model is class-conditional: --{self.name} needs labels it knows")
            return None
        unknown = sorted(set(self.class_names) - set(model_names))
        if unknown:
            raise ValueError(f"--{self.name} has classes {unknown} the model does not know ({model_names})")
        return np.array([model_names.index(self.class_names[label]) for label in self.labels])

    def summary(self) -> dict:
        counts = None
        if self.labels is not None and self.class_names is not None:
            counts = {name: int((self.labels == i).sum()) for i, name in enumerate(self.class_names)}
        return {"source": self.source, "count": len(self), "shape": list(self.images.shape[1:]), "per_class": counts}


def at_generated_resolution(sets: dict[str, ImageSet | None]) -> tuple[dict[str, ImageSet | None], list[str]]:
    """Every real set (``real``, ``train``, ``test``) at the size of ``generated`` when only the size differs (a
    model trained at 32 px on 128 px scans); the notes say which sets were resized. Another channel count stays an
    error for ``check_compatible`` to name."""
    generated = sets["generated"]
    channels, height, width = generated.images.shape[1:]
    notes = []
    for name, image_set in sets.items():
        if image_set is None or name == "generated":
            continue
        if image_set.images.shape[1] == channels and tuple(image_set.images.shape[2:]) != (height, width):
            notes.append(f"--{name} resized from {tuple(image_set.images.shape[2:])} to {(height, width)} as the "
                         "training scripts resize")
            sets = {**sets, name: image_set.resized(height, width)}
    return sets, notes


def parse_set_spec(spec: str) -> tuple[Path, dict[str, str]]:
    """``PATH[:key=value,...]`` as the path and its selection (see the module docstring)."""
    path, _, selection = spec.rpartition(":")
    if not path or "=" not in selection:
        return Path(spec), {}
    filters = {}
    for item in selection.split(","):
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ValueError(f"{spec}: selection {item!r} is not key=value")
        filters[key.strip()] = value.strip()
    return Path(path), filters


def _part(value: str, n: int, spec: str) -> np.ndarray:
    try:
        k, parts = (int(x) for x in value.split("/"))
    except ValueError:
        raise ValueError(f"{spec}: part must be K/N, e.g. 1/2, got {value!r}") from None
    if not 1 <= k <= parts:
        raise ValueError(f"{spec}: part {value} needs 1 <= K <= N")
    return np.arange(n) % parts == k - 1


def _npz_selection(archive, count: int, filters: dict[str, str], spec: str) -> np.ndarray:
    """Which of an NPZ's ``count`` images its per-image arrays select (``part`` aside), as a boolean mask."""
    keep = np.ones(count, dtype=bool)
    for key, value in filters.items():
        if key == "part":
            continue
        if key not in archive.files or archive[key].shape[:1] != (count,):
            per_image = [f for f in archive.files if archive[f].shape[:1] == (count,) and f != "images"]
            raise ValueError(f"{spec}: no per-image array {key!r} to select on; per-image arrays: {per_image}")
        keep &= archive[key].astype(str) == value
    return keep


def selected_rows(spec: str, num_rows: int) -> np.ndarray:
    """The rows of ``spec``'s set (``num_rows`` of them, in the loader's order) that its selection keeps: what a
    training script trains on for ``--train_data_dir data.npz:split=training,part=1/2``."""
    path, filters = parse_set_spec(spec)
    keep = np.ones(num_rows, dtype=bool)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            keep &= _npz_selection(archive, num_rows, filters, spec)
    elif set(filters) - {"part"}:
        raise ValueError(f"{spec}: only .npz sets can be selected by {sorted(set(filters) - {'part'})}; folders take "
                         "part=K/N")
    if "part" in filters:
        keep &= _part(filters["part"], num_rows, spec)
    return np.flatnonzero(keep)


def _from_npz(path: Path, filters: dict[str, str], spec: str) -> tuple[np.ndarray, np.ndarray | None, list | None]:
    with np.load(path, allow_pickle=False) as archive:
        if "images" not in archive.files:
            raise ValueError(f"{path}: no 'images' array (arrays: {archive.files})")
        images = archive["images"]
        keep = _npz_selection(archive, len(images), filters, spec)
        labels = archive["labels"].astype(np.int64) if "labels" in archive.files else None
        names = [str(n) for n in archive["class_names"]] if "class_names" in archive.files else None
    if images.ndim not in (3, 4):
        raise ValueError(f"{path}: 'images' must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
    if labels is not None and (labels < 0).all():
        labels = None  # medsyn generate writes -1 for unconditional samples
    indices = np.flatnonzero(keep)
    # the loader's pixel rules: wider integers windowed per image, floats only if in [0, 1]
    return to_uint8(images[indices], str(path)), None if labels is None else labels[indices], names


def _from_dataset(path: Path) -> tuple[np.ndarray, np.ndarray | None, list | None]:
    from medsyn.data import load_image_dataset

    dataset = load_image_dataset(path)
    sizes = {image.size for image in dataset["image"]}
    if len(sizes) > 1:
        raise ValueError(f"{path}: images have different sizes {sorted(sizes)[:3]}; resize them to one size first")
    images = np.stack([np.asarray(image) for image in dataset["image"]])
    names = dataset.features["label"].names
    labels = np.array(dataset["label"], dtype=np.int64) if names != ["unlabelled"] else None
    return images, labels, None if labels is None else names


def load_image_set(spec: str, name: str) -> ImageSet:
    """Read ``spec`` (see the module docstring) as an ``ImageSet`` called ``name`` (for messages)."""
    path, filters = parse_set_spec(spec)
    if not path.exists():
        raise ValueError(f"--{name} {spec}: no such file or folder")
    if path.suffix == ".npz":
        images, labels, names = _from_npz(path, filters, spec)
    else:
        unknown = set(filters) - {"part"}
        if unknown:
            raise ValueError(f"{spec}: only .npz sets can be selected by {sorted(unknown)}; folders take part=K/N")
        images, labels, names = _from_dataset(path)
    if "part" in filters:
        keep = np.flatnonzero(_part(filters["part"], len(images), spec))
        images, labels = images[keep], None if labels is None else labels[keep]
    if len(images) == 0:
        raise ValueError(f"--{name} {spec}: the selection is empty")
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"--{name} {spec}: images need 1 or 3 channels, got {images.shape[-1]}")
    if labels is not None and names is not None and labels.max() >= len(names):
        raise ValueError(f"--{name} {spec}: label {labels.max()} outside class_names {names}")
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(name, tensor, labels, names, spec)
