"""Validation images of a training run: sample grids as uint8, saved as PNG and shown in tensorboard."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from PIL import Image


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
    """Float images (N, H, W, C) in [0, 1], in row-major order, as one uint8 grid of ``rows`` rows:
    (H', W') for one channel, (H', W', 3) for RGB."""
    images = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
    count, height, width, channels = images.shape
    if count % rows:
        raise ValueError(f"{count} images do not fill {rows} rows")
    columns = count // rows
    grid = images.reshape(rows, columns, height, width, channels).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * height, columns * width, channels)
    return grid[..., 0] if channels == 1 else grid


def save_validation_image(
    args: argparse.Namespace, accelerator: Accelerator, image: np.ndarray, step: int, tag: str = "validation"
) -> None:
    """``<output_dir>/validation/step-<step>.png``, and the same image in tensorboard under ``tag``."""
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(exist_ok=True)
    Image.fromarray(image).save(folder / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, image if image.ndim == 3 else image[..., None], step, dataformats="HWC")
