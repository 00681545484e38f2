"""What the pixel-space class-conditional scripts share (score model, DDPM): the unet's flags, labelled batches,
label dropout for classifier-free guidance, and the validation grid of samples per class."""

from __future__ import annotations

import argparse
import json
import shlex
from typing import Any

import numpy as np
import torch

from medsyn.models.score_unet import score_unet_config
from medsyn.training.validation_images import image_grid
from medsyn.validation import count_argument, number_argument


def add_class_unet_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The unet's shape (``score_unet_config``'s arguments) and class conditioning; returns the group for more."""
    model = parser.add_argument_group("model")
    model.add_argument("--base_channels", type=count_argument(), default=64, help="Channels of the first UNet level.")
    model.add_argument("--channel_mult", type=count_argument(), nargs="+", default=[1, 2, 4, 8],
                       help="Channel multiplier per UNet level (the number of levels sets the downsampling).")
    model.add_argument("--layers_per_block", type=count_argument(), default=2, help="Residual blocks per level.")
    model.add_argument("--norm_num_groups", type=count_argument(), default=32,
                       help="Groups of the group normalisation.")
    model.add_argument("--class_conditional", action="store_true", help="Condition on the dataset's labels.")
    model.add_argument("--label_drop_rate", type=number_argument(0), default=0.1,
                       help="Fraction of labels replaced by the null class, for classifier-free guidance.")
    return model


def check_class_unet_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0.0 <= args.label_drop_rate < 1.0:
        parser.error(f"--label_drop_rate must be in [0, 1), got {args.label_drop_rate}")
    if args.resolution % 2 ** (len(args.channel_mult) - 1):
        parser.error(f"--resolution {args.resolution} must be divisible by 2**{len(args.channel_mult) - 1}")


def unet_config_from_arguments(args: argparse.Namespace, channels: int, num_classes: int) -> dict[str, Any]:
    """``score_unet_config`` from the flags (num_classes ignored unless --class_conditional)."""
    return score_unet_config(
        sample_size=args.resolution, in_channels=channels,
        num_classes=num_classes if args.class_conditional else None, base_channels=args.base_channels,
        channel_mult=tuple(args.channel_mult), layers_per_block=args.layers_per_block,
        norm_num_groups=args.norm_num_groups,
    )


def labelled_dataloader(dataset, to_tensor, args: argparse.Namespace) -> torch.utils.data.DataLoader:
    """Shuffled batches of {"pixel_values": (B, C, H, W) in [-1, 1], "labels": (B,)}; a last partial batch is
    dropped unless the data is smaller than one batch."""

    def collate(rows):
        pixels = torch.stack([to_tensor(row["image"]) for row in rows])
        return {"pixel_values": pixels, "labels": torch.tensor([row["label"] for row in rows], dtype=torch.long)}

    return torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
        num_workers=args.dataloader_num_workers, drop_last=len(dataset) >= args.train_batch_size,
    )


def drop_labels(labels: torch.Tensor, null_label: int | None, rate: float,
                generator: torch.Generator) -> torch.Tensor | None:
    """Labels with a ``rate`` share replaced by the null class (what guidance's unconditional half learns from);
    None for an unconditional unet."""
    if null_label is None:
        return None
    drop = torch.rand(labels.shape[0], generator=generator, device=labels.device) < rate
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def class_card_fields(args: argparse.Namespace, class_names: list[str] | None, unet) -> dict[str, object]:
    """The model card's fields about classes, guidance and the unet, shared by the score and DDPM cards."""
    return dict(
        example_labels=json.dumps(class_names[:1] * 4) if class_names else "None",
        example_cli=f"--class-label {shlex.quote(class_names[0])}" if class_names else "",
        class_names=", ".join(class_names) if class_names else "unconditional",
        label_drop_rate=args.label_drop_rate if class_names else "n/a",
        sample_grid="samples.png",
        resolution=unet.config.sample_size,
        unet_summary=f"UNet2DModel, {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, "
        f"channels {list(unet.config.block_out_channels)}",
    )


def class_sample_grid(pipeline, class_names: list[str] | None, per_class: int, guidance_scale: float, seed: int,
                      **sampling: Any) -> np.ndarray:
    """A (classes x per_class) uint8 grid of samples, rows in class order; one row when unconditional."""
    labels = [c for c in range(len(class_names)) for _ in range(per_class)] if class_names else None
    images = pipeline(
        batch_size=per_class,
        class_labels=labels,
        guidance_scale=guidance_scale if labels else 1.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **sampling,
    ).images
    return image_grid(images, rows=max(1, len(class_names or [None])))
