"""The ``medsyn`` command: ``demo``, ``generate`` and ``pixel-noise-baseline``.

Heavy imports happen inside the subcommands, so ``medsyn --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEMO_TRAINING = [
    "--base_channels", "32", "--channel_mult", "1", "2", "2", "--layers_per_block", "1", "--norm_num_groups", "8",
    "--class_conditional", "--use_ema", "--ema_decay", "0.995", "--simulated_num_images", "2000",
    "--train_batch_size", "32", "--learning_rate", "5e-4", "--num_noise_levels", "40", "--n_steps_each", "3",
    "--checkpointing_steps", "100000", "--validation_guidance_scale", "2.0", "--num_validation_images", "8",
]


def demo(args: argparse.Namespace) -> int:
    """Train a small class-conditional score model on simulated brain MRI and write a grid of samples."""
    import numpy as np
    from PIL import Image

    from medsyn.data import SimulatedBrainMRI
    from medsyn.train_scripts.train_score_langevin import main as train, parse_args

    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        print(f"error: {output_dir} is not empty; pass --overwrite or choose another --output-dir", file=sys.stderr)
        return 2
    started = time.perf_counter()
    train(parse_args(DEMO_TRAINING + [
        "--resolution", str(args.resolution), "--max_train_steps", str(args.max_train_steps), "--seed", str(args.seed),
        "--validation_steps", str(args.max_train_steps), "--output_dir", str(output_dir / "model"),
        "--report_to", "tensorboard",
    ]))
    trained = time.perf_counter() - started

    real = SimulatedBrainMRI(resolution=args.resolution, seed=args.seed + 1).generate(64)
    rows = [np.concatenate(list(real["images"][real["labels"] == c][:8]), axis=1) for c in (0, 1)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(output_dir / "simulated_training_examples.png")
    samples = output_dir / "samples.png"
    samples.write_bytes((output_dir / "model" / "samples.png").read_bytes())
    summary = {
        "model": str(output_dir / "model"),
        "resolution": args.resolution,
        "train_steps": args.max_train_steps,
        "train_seconds": round(trained, 1),
        "samples": str(samples),
        "rows": "healthy (top), tumor (bottom); guidance 2.0",
        "generate_more": f"medsyn generate --model {output_dir / 'model'} --class-label tumor --num-images 16 "
        f"--output-dir {output_dir / 'generated'}",
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


def generate(args: argparse.Namespace) -> int:
    """Generate images from a saved ScoreLangevinPipeline into PNG files or one NPZ."""
    import numpy as np
    import torch
    from PIL import Image

    from medsyn.pipelines import ScoreLangevinPipeline
    from medsyn.seeding import keyed_generator

    output_dir = Path(args.output_dir)
    names = [f"{args.class_label or 'sample'}_{args.seed}_{i:06d}.png" for i in range(args.num_images)]
    targets = [output_dir / "samples.npz"] if args.format == "npz" else [output_dir / n for n in names]
    clashes = [t for t in targets if t.exists()]
    if clashes and not args.overwrite:
        print(f"error: {clashes[0]} exists ({len(clashes)} files would be overwritten); pass --overwrite",
              file=sys.stderr)
        return 2
    pipe = ScoreLangevinPipeline.from_pretrained(args.model)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    if args.compile:
        pipe.unet.compile()
    labels = None
    if args.class_label is not None:
        label = int(args.class_label) if args.class_label.isdigit() else args.class_label
        labels = pipe.encode_class_labels(label, 1).tolist() * args.num_images
    output_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for start in range(0, args.num_images, args.batch_size):
        count = min(args.batch_size, args.num_images - start)
        # Image i depends only on (seed, i): a run can be extended or split without changing earlier images.
        generators = [keyed_generator(args.seed, i) for i in range(start, start + count)]
        batch = pipe(
            batch_size=count,
            class_labels=None if labels is None else labels[start : start + count],
            num_inference_steps=args.num_inference_steps,
            n_steps_each=args.n_steps_each,
            guidance_scale=args.guidance_scale,
            generator=generators,
            output_type="np",
            autocast_dtype=torch.bfloat16 if args.bf16 else None,
        ).images
        batch = np.round(batch * 255).astype(np.uint8)
        if args.format == "png":
            for offset, image in enumerate(batch):
                Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(output_dir / names[start + offset])
        else:
            images.append(batch)
    if args.format == "npz":
        stacked = np.concatenate(images)
        np.savez_compressed(
            output_dir / "samples.npz",
            images=stacked[..., 0] if stacked.shape[-1] == 1 else stacked,
            labels=np.array(labels if labels is not None else [-1] * args.num_images, dtype=np.int64),
            class_names=np.array(pipe.config.class_names or []),
        )
    print(f"wrote {args.num_images} images to {output_dir}")
    return 0


def pixel_noise(args: argparse.Namespace) -> int:
    """Write the pixel-noise baseline of a dataset as one NPZ (images, labels, class_names, sources)."""
    import numpy as np

    from medsyn.baselines import pixel_noise_baseline
    from medsyn.data import load_image_dataset

    target = Path(args.output_dir) / "pixel_noise_baseline.npz"
    if target.exists() and not args.overwrite:
        print(f"error: {target} exists; pass --overwrite", file=sys.stderr)
        return 2
    dataset = load_image_dataset(args.data)
    sizes = {row.size for row in dataset["image"]}
    if len(sizes) > 1:
        raise ValueError(f"{args.data}: images have different sizes {sorted(sizes)[:3]}; resize them first")
    images = np.stack([np.asarray(image) for image in dataset["image"]])
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        target,
        images=pixel_noise_baseline(images, sigma=args.sigma, seed=args.seed),
        labels=np.array(dataset["label"], dtype=np.int64),
        class_names=np.array(dataset.features["label"].names),
        sources=np.array(dataset["source"]),
    )
    print(f"wrote {len(images)} noisy copies (sigma {args.sigma}) to {target}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsyn", description="Synthetic medical images with diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo_parser = commands.add_parser("demo", help="train a small model on simulated brain MRI (CPU, minutes)")
    demo_parser.add_argument("--output-dir", default="medsyn-demo")
    demo_parser.add_argument("--resolution", type=int, default=32)
    demo_parser.add_argument("--max-train-steps", type=int, default=700)
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.add_argument("--overwrite", action="store_true")
    demo_parser.set_defaults(handler=demo)

    gen = commands.add_parser("generate", help="generate images from a saved model")
    gen.add_argument("--model", required=True, help="a ScoreLangevinPipeline folder or Hub id")
    gen.add_argument("--class-label", default=None, help="class name or index (default: unconditional)")
    gen.add_argument("--num-images", type=int, default=16)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--output-dir", required=True)
    gen.add_argument("--format", choices=("png", "npz"), default="png")
    gen.add_argument("--batch-size", type=int, default=16)
    gen.add_argument("--guidance-scale", type=float, default=1.0)
    gen.add_argument("--num-inference-steps", type=int, default=None, help="noise levels (default: as trained)")
    gen.add_argument("--n-steps-each", type=int, default=None)
    gen.add_argument("--bf16", action="store_true", help="run the network under bfloat16 autocast")
    gen.add_argument("--compile", action="store_true", help="torch.compile the network (slow first batch)")
    gen.add_argument("--overwrite", action="store_true")
    gen.set_defaults(handler=generate)

    noise = commands.add_parser("pixel-noise-baseline", help="real images + N(0, sigma^2) noise, clipped")
    noise.add_argument("--data", required=True, help="image folder, manifest or .npz")
    noise.add_argument("--output-dir", required=True)
    noise.add_argument("--sigma", type=float, default=0.3)
    noise.add_argument("--seed", type=int, default=0)
    noise.add_argument("--overwrite", action="store_true")
    noise.set_defaults(handler=pixel_noise)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "num_images", 1) < 1:
        print("error: --num-images must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    except ValueError as error:  # bad input: say what is wrong, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
