"""`medsyn pixel-noise-baseline`: real images plus Gaussian pixel noise, the baseline any generator must beat."""

from __future__ import annotations

import argparse
from pathlib import Path

from medsyn.commands.common import would_overwrite
from medsyn.validation import count_argument, number_argument


def add_parser(commands, shown: dict) -> None:
    noise = commands.add_parser("pixel-noise-baseline", **shown, help="real images + N(0, sigma^2) noise, clipped")
    noise.add_argument("--data", required=True, help="image folder, manifest or .npz")
    noise.add_argument("--output-dir", required=True, help="folder for pixel_noise_baseline.npz")
    noise.add_argument("--sigma", type=number_argument(0, exclusive=True), default=0.3,
                       help="noise standard deviation on the [0, 1] scale")
    noise.add_argument("--seed", type=count_argument(0), default=0, help="seed of the noise")
    noise.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    noise.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Write the pixel-noise baseline of a dataset as one NPZ (images, labels, class_names, sources)."""
    import numpy as np

    from medsyn.baselines import pixel_noise_baseline
    from medsyn.data import load_image_dataset
    from medsyn.output_files import check_writable, write_npz_atomically

    target = Path(args.output_dir) / "pixel_noise_baseline.npz"
    if would_overwrite([target], args.overwrite):
        return 2
    dataset = load_image_dataset(args.data)
    sizes = {row.size for row in dataset["image"]}
    if len(sizes) > 1:
        raise ValueError(f"{args.data}: images have different sizes {sorted(sizes)[:3]}; resize them first")
    images = np.stack([np.asarray(image) for image in dataset["image"]])
    check_writable(target.parent)
    write_npz_atomically(
        target,
        images=pixel_noise_baseline(images, sigma=args.sigma, seed=args.seed),
        labels=np.array(dataset["label"], dtype=np.int64),
        class_names=np.array(dataset.features["label"].names),
        sources=np.array(dataset["source"]),
    )
    print(f"wrote {len(images)} noisy copies (sigma {args.sigma}) to {target}")
    return 0
