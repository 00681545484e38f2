"""One loader for the ways hospitals keep labelled images, all yielding the same ``datasets.Dataset``.

Sources: an image folder with one sub-folder per class (PNG/JPEG/TIFF/BMP, DICOM or NIfTI files inside); a
CSV or JSONL manifest (``path`` plus optional ``caption``/``text``, ``label``, ``modality``); an ``.npz`` with
``images``, ``labels`` and ``class_names`` (the layout of ../shared/data); a single DICOM or NIfTI file. Every
record becomes a row ``image`` (PIL, mode "L" or "RGB"), ``label`` (a ``ClassLabel``), ``caption`` and
``source`` (file, and slice for volumes), so provenance survives into the privacy audit.

Images keep their channel count: grayscale stays 1-channel and RGB 3-channel. A set that mixes the two is an
error unless ``channels`` says what to convert to.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .intensity import to_uint8, window_to_uint8

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
NIFTI_SUFFIXES = {".nii", ".nii.gz"}
CAPTION_COLUMNS = ("caption", "text")
#: A manifest's image column, by its first name present: medsyn's own, the shared sets' and datasets' imagefolder.
PATH_COLUMNS = ("path", "file", "file_name")
#: Its label column: a class name beats an integer code, which would become the class name "1".
LABEL_COLUMNS = ("class_name", "label")
#: A folder holding one of these at its root is read through it, not through its sub-folders.
FOLDER_MANIFESTS = ("metadata.csv", "metadata.jsonl", "labels.csv", "manifest.csv", "manifest.jsonl")


@dataclass
class Record:
    """One 2D image before it joins the dataset."""

    image: Image.Image
    source: str
    label: str | None = None
    caption: str | None = None
    modality: str | None = None


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()


def _array_to_image(array: np.ndarray, source: str) -> Image.Image:
    """An (H, W), (H, W, 1) or (H, W, 3) array to a PIL image: uint8 as it is, wider integers (12- or 16-bit
    scans) windowed to their own 0.5-99.5 percentile range, floats only if in [0, 1]."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(f"{source}: expected an (H, W) or (H, W, 1|3) image, got shape {array.shape}")
    array = to_uint8(array[None], source)[0]  # the pixel rules of medsyn.data.intensity
    return Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB")


def _read_picture(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path}: unreadable or corrupt image ({error})") from error
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in ("I;16", "I;16B", "I", "F"):
        return _array_to_image(window_to_uint8(np.asarray(image), None, str(path)), str(path))
    if image.mode in ("RGBA", "P", "CMYK", "YCbCr", "LA"):
        return image.convert("L" if image.mode == "LA" else "RGB")
    if image.mode == "1":
        return image.convert("L")
    raise ValueError(f"{path}: unsupported image mode {image.mode}")


def _read_dicom(path: Path, window: tuple[float, float] | None) -> Iterator[tuple[Image.Image, str]]:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut
    except ImportError as error:
        raise ImportError("reading DICOM needs pydicom: pip install 'medsyn[dicom]'") from error
    try:
        dataset = pydicom.dcmread(path)
        pixels = apply_modality_lut(dataset.pixel_array, dataset)
    except Exception as error:  # pydicom raises many types for broken files
        raise ValueError(f"{path}: unreadable or corrupt DICOM ({error})") from error
    if window is None and "WindowCenter" in dataset and "WindowWidth" in dataset:
        centre, width = dataset.WindowCenter, dataset.WindowWidth
        first = lambda value: float(value[0]) if isinstance(value, pydicom.multival.MultiValue) else float(value)  # noqa: E731
        window = (first(centre), first(width))
    frames = pixels if pixels.ndim == 3 and dataset.get("SamplesPerPixel", 1) == 1 else pixels[None]
    for index, frame in enumerate(frames):
        image = window_to_uint8(frame, window, str(path))
        if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
            image = 255 - image
        yield _array_to_image(image, str(path)), str(path) if len(frames) == 1 else f"{path}#frame={index}"


def _read_nifti(
    path: Path, window: tuple[float, float] | None, slice_axis: int, skip_empty_slices: bool
) -> Iterator[tuple[Image.Image, str]]:
    try:
        import nibabel
    except ImportError as error:
        raise ImportError("reading NIfTI needs nibabel: pip install 'medsyn[dicom]'") from error
    try:
        volume = np.asarray(nibabel.load(path).get_fdata(dtype=np.float32))
    except Exception as error:  # nibabel raises many types for broken files
        raise ValueError(f"{path}: unreadable or corrupt NIfTI ({error})") from error
    if volume.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {volume.shape}")
    if not np.isfinite(volume).all():
        raise ValueError(f"{path}: volume contains NaN or Inf")
    if window is None:  # one window for the whole volume keeps slices comparable
        low, high = np.percentile(volume, [0.5, 99.5])
        window = ((low + high) / 2, max(high - low, 1e-6))
    for index in range(volume.shape[slice_axis]):
        plane = np.take(volume, index, axis=slice_axis)
        if skip_empty_slices and np.ptp(plane) == 0:
            continue
        yield _array_to_image(window_to_uint8(plane, window, str(path)), str(path)), f"{path}#slice={index}"


def _read_file(path: Path, window, slice_axis, skip_empty_slices) -> Iterator[tuple[Image.Image, str]]:
    suffix = _suffix(path)
    if suffix in IMAGE_SUFFIXES:
        yield _read_picture(path), str(path)
    elif suffix in DICOM_SUFFIXES:
        yield from _read_dicom(path, window)
    elif suffix in NIFTI_SUFFIXES:
        yield from _read_nifti(path, window, slice_axis, skip_empty_slices)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}")


def _is_readable(path: Path) -> bool:
    return path.is_file() and _suffix(path) in IMAGE_SUFFIXES | DICOM_SUFFIXES | NIFTI_SUFFIXES


class _Collector:
    """Reads files into records, raising on a bad one or, with ``on_error="skip"``, counting it."""

    def __init__(self, on_error: str, window, slice_axis: int, skip_empty_slices: bool):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error, self.window, self.slice_axis, self.skip_empty = on_error, window, slice_axis, skip_empty_slices
        self.records: list[Record] = []
        self.skipped: list[str] = []

    def add_file(self, path: Path, **fields) -> None:
        try:
            for image, source in _read_file(path, self.window, self.slice_axis, self.skip_empty):
                self.records.append(Record(image=image, source=source, **fields))
        except ValueError as error:
            if self.on_error == "raise":
                raise
            self.skipped.append(str(error))


def _from_folder(root: Path, collector: _Collector) -> None:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_dirs:
        for class_dir in class_dirs:
            for path in sorted(p for p in class_dir.rglob("*") if _is_readable(p)):
                collector.add_file(path, label=class_dir.name)
    else:
        for path in sorted(p for p in root.iterdir() if _is_readable(p)):
            collector.add_file(path)


def _manifest_rows(path: Path) -> list[dict]:
    if _suffix(path) == ".csv":
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg})") from error
    return rows


def _from_manifest(path: Path, collector: _Collector) -> None:
    rows = _manifest_rows(path)
    if not rows:
        raise ValueError(f"{path}: the manifest has no rows")
    column = next((c for c in PATH_COLUMNS if c in rows[0]), None)
    if column is None:
        raise ValueError(f"{path}: the manifest has no image column, one of {list(PATH_COLUMNS)} "
                         f"(columns: {sorted(rows[0])})")
    label_column = next((c for c in LABEL_COLUMNS if c in rows[0]), None)
    for number, row in enumerate(rows, start=1):
        if not row.get(column):
            raise ValueError(f"{path}: row {number} has an empty {column!r}")
        image_path = Path(row[column])
        image_path = image_path if image_path.is_absolute() else path.parent / image_path
        if not image_path.is_file():
            message = f"{path}: row {number}: image file {image_path} does not exist"
            if collector.on_error == "raise":
                raise ValueError(message)
            collector.skipped.append(message)
            continue
        caption = next((row[c] for c in CAPTION_COLUMNS if row.get(c)), None)
        label = row.get(label_column) if label_column else None
        collector.add_file(
            image_path, label=None if label in (None, "") else str(label), caption=caption, modality=row.get("modality")
        )


def _from_npz(path: Path, collector: _Collector) -> list[str] | None:
    with np.load(path, allow_pickle=False) as archive:
        if "images" not in archive.files:
            raise ValueError(f"{path}: no 'images' array (arrays: {archive.files})")
        images = archive["images"]
        labels = archive["labels"] if "labels" in archive.files else None
        names = [str(n) for n in archive["class_names"]] if "class_names" in archive.files else None
        captions = [str(c) for c in archive["captions"]] if "captions" in archive.files else None
    if images.ndim not in (3, 4):
        raise ValueError(f"{path}: 'images' must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{path}: {len(labels)} labels for {len(images)} images")
    if np.issubdtype(images.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(images.reshape(len(images), -1)).all(axis=1))
        if len(bad):
            raise ValueError(f"{path}: images {bad[:5].tolist()} contain NaN or Inf ({len(bad)} images in all)")
    for index in range(len(images)):
        label = None
        if labels is not None:
            value = int(labels[index])
            if names is not None and not 0 <= value < len(names):
                raise ValueError(f"{path}: image {index} has label {value}, outside class_names {names}")
            label = names[value] if names is not None else str(value)
        try:
            image = _array_to_image(images[index], f"{path}[{index}]")
        except ValueError as error:
            if collector.on_error == "raise":
                raise
            collector.skipped.append(str(error))
            continue
        collector.records.append(
            Record(image=image, source=f"{path}#{index}", label=label, caption=captions[index] if captions else None)
        )
    return names


def _harmonise_channels(records: list[Record], channels: int | None) -> None:
    """Keep one channel count: the data's own, or the requested one by explicit conversion."""
    if channels is not None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        mode = "L" if channels == 1 else "RGB"
        for record in records:
            record.image = record.image.convert(mode) if record.image.mode != mode else record.image
        return
    by_mode: dict[str, str] = {}
    for record in records:
        by_mode.setdefault(record.image.mode, record.source)
    if len(by_mode) > 1:
        examples = ", ".join(f"{mode}: {source}" for mode, source in by_mode.items())
        raise ValueError(f"mixed channel counts ({examples}); pass channels=1 or channels=3 "
                         "(--num_channels 1 or 3 in the training scripts) to convert explicitly")


def _to_dataset(rows: dict[str, list], names: list[str]):
    """The one schema every medsyn dataset shares."""
    import datasets

    features = datasets.Features(
        image=datasets.Image(),
        label=datasets.ClassLabel(names=names),
        caption=datasets.Value("string"),
        source=datasets.Value("string"),
    )
    return datasets.Dataset.from_dict(rows, features=features)


def load_image_dataset(
    source: str | Path,
    class_names: list[str] | None = None,
    channels: int | None = None,
    caption_template: str = "{modality}, {label}",
    modality: str = "medical image",
    window: tuple[float, float] | None = None,
    slice_axis: int = 2,
    skip_empty_slices: bool = True,
    on_error: str = "raise",
):
    """Load labelled medical images as a ``datasets.Dataset`` with columns image, label, caption, source.

    Args:
        source: an image folder (class sub-folders, or a manifest at its root named as in ``FOLDER_MANIFESTS``),
            a ``.csv``/``.jsonl`` manifest (image column ``path``, ``file`` or ``file_name``; label ``class_name``
            or ``label``), an ``.npz``, or one DICOM or NIfTI file.
        class_names: the label order; labels outside it are an error. Default: the labels found, sorted (for an
            ``.npz``, its ``class_names``).
        channels: convert every image to 1 or 3 channels; default keeps the data's own and rejects a mix.
        caption_template: caption for rows without one, formatted with ``label`` and ``modality``.
        modality: default modality for captions (a manifest's ``modality`` column overrides it per row).
        window: (centre, width) intensity window for DICOM/NIfTI; default: the file's own DICOM window, else
            the 0.5-99.5 percentile range.
        slice_axis: axis along which NIfTI volumes are cut into 2D slices (2: axial for RAS volumes).
        skip_empty_slices: drop constant NIfTI slices (air outside the body).
        on_error: "raise" a ``ValueError`` at the first bad file, or "skip" bad files and warn with a count.

    Returns:
        The dataset; its ``label`` feature is a ``ClassLabel`` whose ``names`` give the label order.
    """
    path = Path(source)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    collector = _Collector(on_error, window, slice_axis, skip_empty_slices)
    npz_names = None
    manifest = next((path / name for name in FOLDER_MANIFESTS if (path / name).is_file()), None) \
        if path.is_dir() else None
    if manifest is not None:
        _from_manifest(manifest, collector)
    elif path.is_dir():
        _from_folder(path, collector)
    elif _suffix(path) in (".csv", ".jsonl"):
        _from_manifest(path, collector)
    elif _suffix(path) == ".npz":
        npz_names = _from_npz(path, collector)
    else:
        collector.add_file(path)
    records = collector.records
    if collector.skipped:
        warnings.warn(
            f"skipped {len(collector.skipped)} bad inputs of {len(records) + len(collector.skipped)}: "
            + "; ".join(collector.skipped[:5]),
            stacklevel=2,
        )
    if not records:
        raise ValueError(f"{path}: no readable images found")
    _harmonise_channels(records, channels)

    found = sorted({r.label for r in records if r.label is not None})
    names = list(class_names or npz_names or found or ["unlabelled"])
    unknown = [r for r in records if r.label is not None and r.label not in names]
    if unknown:
        raise ValueError(f"{unknown[0].source}: unknown label {unknown[0].label!r}; known labels are {names}")
    unlabelled = [r for r in records if r.label is None]
    if unlabelled and found:
        raise ValueError(f"{unlabelled[0].source}: no label, while other images have labels")

    rows = {"image": [], "label": [], "caption": [], "source": []}
    for record in records:
        label = record.label if record.label is not None else names[0]
        caption = record.caption or caption_template.format(
            label=label.replace("_", " "), modality=record.modality or modality
        )
        rows["image"].append(record.image)
        rows["label"].append(names.index(label))
        rows["caption"].append(caption)
        rows["source"].append(record.source)
    return _to_dataset(rows, names)


def simulated_dataset(num_images: int, resolution: int = 128, seed: int = 0, tumour_fraction: float = 0.5):
    """The simulated brain MRI set as the same kind of ``datasets.Dataset`` as ``load_image_dataset`` returns."""
    from medsyn.data.simulated_mri import CLASS_NAMES, SimulatedBrainMRI

    data = SimulatedBrainMRI(resolution=resolution, seed=seed, tumour_fraction=tumour_fraction).generate(num_images)
    rows = {
        "image": [Image.fromarray(image, mode="L") for image in data["images"]],
        "label": data["labels"].tolist(),
        "caption": data["captions"],
        "source": [f"simulated:seed={seed}#{i}" for i in range(num_images)],
    }
    return _to_dataset(rows, list(CLASS_NAMES))
