"""Audit inputs in one representation before any distance: (N, H, W, C) stacks on one scale.

A copy must be found at distance 0 however it was stored: ``pipe(..., output_type="np")`` gives float [0, 1]
(N, H, W, C), a training set is often uint8, a torch pipeline gives (N, C, H, W). Each set is brought to
(N, H, W, C) with the pixel rules of ``medsyn.data.intensity``; a pair is then brought to one dtype (uint8 stays
uint8 when both are, so 42,000 images of 128x128 take 0.7 GB, not 2.8 GB). Ambiguous input is an error.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import torch

from medsyn.data.intensity import check_unit_range, to_uint8

CHANNEL_COUNTS = (1, 3)


class Layout(StrEnum):
    """Where the channel axis of a 4-D stack is."""

    NHWC = "NHWC"
    NCHW = "NCHW"


def _layout_of(shape: tuple[int, ...], name: str, layout: Layout | str | None) -> Layout:
    if layout is not None:
        return Layout(layout)
    first, last = shape[1] in CHANNEL_COUNTS, shape[3] in CHANNEL_COUNTS
    if first and last:
        raise ValueError(f"{name}: shape {shape} could be (N, C, H, W) or (N, H, W, C); pass layout='NCHW' or 'NHWC'")
    if not (first or last):
        raise ValueError(f"{name}: shape {shape} has no channel axis of 1 or 3 (need (N, H, W), (N, H, W, C) or "
                         "(N, C, H, W))")
    return Layout.NCHW if first else Layout.NHWC


def as_image_stack(images: np.ndarray | torch.Tensor, name: str, layout: Layout | str | None = None) -> torch.Tensor:
    """``images`` as an (N, H, W, C) tensor: uint8 as it is, other integers windowed to uint8, floats checked to
    lie in [0, 1] and kept in their precision.

    Accepted: one image (H, W); a grayscale stack (N, H, W); a stack (N, H, W, C) or (N, C, H, W) with C in
    (1, 3), told apart by where the 1 or 3 is (``layout`` settles tiny images where both axes could be).
    """
    tensor = images.detach().cpu() if torch.is_tensor(images) else torch.as_tensor(np.ascontiguousarray(images))
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim == 3:
        tensor = tensor[..., None]
    if tensor.ndim != 4:
        raise ValueError(f"{name}: need an image (H, W) or a stack (N, H, W[, C]) / (N, C, H, W), got shape "
                         f"{tuple(tensor.shape)}")
    if len(tensor) == 0:
        raise ValueError(f"{name}: need a non-empty stack of images, got shape {tuple(tensor.shape)}")
    if _layout_of(tuple(tensor.shape), name, layout) is Layout.NCHW:
        tensor = tensor.permute(0, 2, 3, 1)
    if tensor.dtype == torch.uint8:
        return tensor.contiguous()
    if tensor.is_floating_point():
        finite = bool(torch.isfinite(tensor).all())
        check_unit_range(finite, float(tensor.min()) if finite else 0.0, float(tensor.max()) if finite else 0.0, name)
        return tensor.contiguous()
    return torch.from_numpy(to_uint8(tensor.numpy(), name))


def common_representation(*stacks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(N, H, W, C) stacks in one dtype: uint8 if all are, else the least precise float among them.

    A uint8 image becomes ``value / 255`` in that float dtype, exactly what ``images / 255`` gives in numpy, so a
    float copy of a uint8 training image is at distance 0. Stacks already in that dtype come back as they are.
    """
    sizes = {tuple(t.shape[1:]) for t in stacks}
    if len(sizes) > 1:
        raise ValueError(f"images differ in (height, width, channels): {' and '.join(map(str, sorted(sizes)))}; "
                         "same size and channels needed")
    floats = [t.dtype for t in stacks if t.is_floating_point()]
    if not floats:
        return stacks
    dtype = max(floats, key=lambda d: torch.finfo(d).eps)
    convert = lambda t: t.to(dtype) / 255 if t.dtype == torch.uint8 else t.to(dtype)  # noqa: E731
    return tuple(convert(t) for t in stacks)
