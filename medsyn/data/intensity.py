"""The one set of rules by which medsyn turns stored pixel values into 8-bit grey levels or [0, 1] floats.

The loader, ``medsyn evaluate`` and the memorisation audit all read images through these rules, so that one
image stored three ways (uint8, 16-bit, float) means the same thing everywhere:

- ``uint8`` is taken as it is (0..255).
- Integer images of more than 8 bits (uint16 12-bit scans, int16 CT) are windowed per image: a given
  (centre, width) window, or the image's own 0.5-99.5 percentile range, mapped to 0..255. Scaling by the dtype's
  range would turn a 12-bit scan (0..4095) into grey levels 0..15.
- Floats must already lie in [0, 1]. Anything else (0..255 floats, [-1, 1] model outputs) is an error that
  says how to convert it: guessing the range would silently change every distance the audit measures.
"""

from __future__ import annotations

import numpy as np

PERCENTILE_WINDOW = (0.5, 99.5)


def window_to_uint8(array: np.ndarray, window: tuple[float, float] | None, source: str) -> np.ndarray:
    """Map intensities to 0..255 through a (centre, width) window, or the 0.5-99.5 percentile range if none."""
    array = np.asarray(array, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{source}: image contains NaN or Inf")
    if window is not None:
        centre, width = window
        low, high = centre - width / 2, centre + width / 2
    else:
        low, high = np.percentile(array, PERCENTILE_WINDOW)
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round(np.clip((array - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def check_unit_range(finite: bool, low: float, high: float, source: str) -> None:
    """Floats must be finite and in [0, 1]; the error names the range found and the usual conversions. Takes the
    facts rather than the array, so numpy and torch callers (bfloat16 included) share it."""
    if not finite:
        raise ValueError(f"{source}: images contain NaN or Inf")
    if low < 0 or high > 1:
        hint = "divide 0..255 values by 255" if high > 1 and low >= 0 else "map [-1, 1] values with (x + 1) / 2"
        raise ValueError(f"{source}: float images must lie in [0, 1], got [{low:.4g}, {high:.4g}] ({hint}, "
                         "or store uint8)")


def to_uint8(images: np.ndarray, source: str, window: tuple[float, float] | None = None) -> np.ndarray:
    """A stack of images (first axis) as uint8 grey levels by the module's rules; integer images are windowed
    one by one."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if images.dtype == np.bool_:
        raise ValueError(f"{source}: boolean masks are not images; store grey levels (uint8)")
    if np.issubdtype(images.dtype, np.integer):
        return np.stack([window_to_uint8(image, window, f"{source}[{i}]") for i, image in enumerate(images)])
    if np.issubdtype(images.dtype, np.floating):
        finite = bool(np.isfinite(images).all())
        check_unit_range(finite, float(images.min()) if finite else 0.0, float(images.max()) if finite else 0.0,
                         source)
        return np.round(images.astype(np.float64) * 255).astype(np.uint8)
    raise ValueError(f"{source}: unsupported pixel type {images.dtype}")
