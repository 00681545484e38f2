"""`medsyn demo`: a small class-conditional score model trained on simulated brain MRI, its samples and a label
probe's verdict, on the CPU in minutes."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from medsyn.validation import count_argument


def add_parser(commands, shown: dict) -> None:
    demo_parser = commands.add_parser("demo", **shown,
                                      help="train a small model on simulated brain MRI (CPU, minutes)")
    demo_parser.add_argument("--output-dir", default="medsyn-demo", help="where the model, samples and summary go")
    demo_parser.add_argument("--resolution", type=count_argument(8), default=32, help="image size in pixels")
    demo_parser.add_argument("--max-train-steps", type=count_argument(), default=700, help="optimiser steps")
    demo_parser.add_argument("--seed", type=count_argument(0), default=0, help="seed of data, training and samples")
    demo_parser.add_argument("--probe-images", type=count_argument(0), default=16,
                             help="samples per class judged by the label probe (0: skip the probe)")
    demo_parser.add_argument("--overwrite", action="store_true", help="replace a finished demo in --output-dir")
    demo_parser.set_defaults(handler=run)


# At guidance 2 the label probe read most healthy samples of this tiny model as tumours; at 4 both classes hold.
DEMO_GUIDANCE = 4.0
# Sized for 2 CPU cores (about 5 minutes of training at 32 px). sigma_min 0.05 rather than NCSNv2's 0.01: the
# simulated slices carry Rician noise well above 0.01, so finer levels only add steps the eye cannot see.
DEMO_TRAINING = [
    "--base_channels", "32", "--channel_mult", "1", "2", "2", "--layers_per_block", "1", "--norm_num_groups", "8",
    "--class_conditional", "--use_ema", "--ema_decay", "0.995", "--simulated_num_images", "2000",
    "--train_batch_size", "32", "--learning_rate", "1e-3", "--lr_warmup_steps", "50", "--num_noise_levels", "40",
    "--sigma_min", "0.05", "--n_steps_each", "6", "--checkpointing_steps", "100000",
    "--validation_guidance_scale", str(DEMO_GUIDANCE), "--num_validation_images", "8",
]


def run(args: argparse.Namespace) -> int:
    """Train a small class-conditional score model on simulated brain MRI, write samples and a probe's verdict."""
    import numpy as np
    from PIL import Image

    from medsyn.data import SimulatedBrainMRI
    from medsyn.train_scripts.train_score_langevin import main as train
    from medsyn.train_scripts.train_score_langevin import parse_args

    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        print(f"error: {output_dir} is not empty; pass --overwrite or choose another --output-dir", file=sys.stderr)
        return 2
    started = time.perf_counter()
    train(parse_args(DEMO_TRAINING + [
        "--resolution", str(args.resolution), "--max_train_steps", str(args.max_train_steps), "--seed", str(args.seed),
        "--validation_steps", str(args.max_train_steps + 1), "--output_dir", str(output_dir / "model"),
        "--report_to", "tensorboard",
    ]))
    trained = time.perf_counter() - started

    zoom = max(1, 128 // args.resolution)  # grids shown at 128 px a tile, pixels kept sharp
    real = SimulatedBrainMRI(resolution=args.resolution, seed=args.seed + 1).generate(64)
    rows = [np.concatenate(list(real["images"][real["labels"] == c][:8]), axis=1) for c in (0, 1)]
    save_zoomed(np.concatenate(rows, axis=0), zoom, output_dir / "simulated_training_examples.png")
    samples = output_dir / "samples.png"
    save_zoomed(np.asarray(Image.open(output_dir / "model" / "samples.png")), zoom, samples)
    started = time.perf_counter()
    probe = None
    if args.probe_images:
        probe = demo_probe(output_dir / "model", args.resolution, args.seed, args.probe_images)
    summary = {
        "model": str(output_dir / "model"),
        "resolution": args.resolution,
        "train_steps": args.max_train_steps,
        "train_seconds": round(trained, 1),
        "samples": str(samples),
        "rows": f"healthy (top), tumor (bottom); guidance {DEMO_GUIDANCE}",
        "label_probe": probe,
        "probe_seconds": round(time.perf_counter() - started, 1),
        "generate_more": f"medsyn generate --model {output_dir / 'model'} --class-label tumor --num-images 16 "
        f"--guidance-scale {DEMO_GUIDANCE} --output-dir {output_dir / 'generated'}",
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


def save_zoomed(grid, zoom: int, path: Path) -> None:
    from PIL import Image

    image = Image.fromarray(grid)
    image.resize((image.width * zoom, image.height * zoom), Image.NEAREST).save(path)


def demo_probe(model: Path, resolution: int, seed: int, per_class: int) -> dict:
    """Judge the demo model's samples with a small classifier trained on other simulated images.

    Reports, per class, the share of samples the probe assigns to the class they were generated for, and the
    probe Fréchet distance to held-out real images, each next to what real images (and, for the distance, the
    pixel-noise baseline) score: see ``medsyn.metrics.label_probe``.
    """
    import numpy as np

    from medsyn.baselines import pixel_noise_baseline
    from medsyn.data import SimulatedBrainMRI
    from medsyn.metrics import fit_label_probe, label_probe_report
    from medsyn.pipelines import ScoreLangevinPipeline
    from medsyn.seeding import keyed_generator

    train = SimulatedBrainMRI(resolution=resolution, seed=seed + 2).generate(4000)
    probe = fit_label_probe(train["images"], train["labels"], num_classes=2, epochs=20, seed=seed)
    held_out = SimulatedBrainMRI(resolution=resolution, seed=seed + 3).generate(max(256, 4 * per_class))
    pipe = ScoreLangevinPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    labels = [0] * per_class + [1] * per_class
    images = pipe(
        class_labels=labels,
        guidance_scale=DEMO_GUIDANCE,
        generator=[keyed_generator(seed, 1, i) for i in range(len(labels))],
        output_type="np",
    ).images
    generated = np.round(images[..., 0] * 255).astype(np.uint8)
    names = pipe.class_names
    report = label_probe_report(probe, generated, np.array(labels), held_out["images"], held_out["labels"], names)
    noisy = pixel_noise_baseline(held_out["images"][: len(labels)], seed=seed)
    baseline = label_probe_report(probe, noisy, held_out["labels"][: len(labels)], held_out["images"][len(labels):],
                                  held_out["labels"][len(labels):], names)
    rounded = lambda values: {k: round(v, 3) for k, v in values.items()}  # noqa: E731
    return {
        "class_agreement": rounded(report.class_agreement),
        "real_class_agreement": rounded(report.real_class_agreement),
        "frechet_distance": round(report.frechet_distance, 3),
        "real_frechet_distance": round(report.real_frechet_distance, 3),
        "pixel_noise_baseline_frechet_distance": round(baseline.frechet_distance, 3),
    }
