"""Held-out accuracy per noise level of two alignment experts trained alike on the same data: one on clean images, one
with ``--noise_augment`` (the score model's variance-exploding noise by default), both judged on the same noised
held-out images (seeded). It shows where an expert's features of the UNet's noisy input carry class information, and
so where alignment can teach anything.

    python benchmarks/bench_noise_aware_expert.py --data /tmp/brain64/training.npz --resolution 64 \\
        --output-dir /tmp/bench-expert --steps 1500
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medsyn.metrics.features import PooledImageEncoder
from medsyn.train_scripts import train_expert
from medsyn.training.feature_alignment import FrozenExpert

RECIPE = ["--embedding_size", "16", "--hidden_sizes", "32", "64", "128", "--depths", "1", "1", "1",
          "--layer_type", "basic", "--train_batch_size", "64", "--learning_rate", "1e-3", "--augment",
          "--report_to", "none", "--checkpointing_steps", "100000"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a labelled image folder, manifest or .npz")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--noise", choices=("ve", "ddpm"), default="ve")
    parser.add_argument("--sigma-min", type=float, default=0.05, help="ve: the score model's smallest level")
    parser.add_argument("--levels", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    output = Path(args.output_dir)
    common = [*RECIPE, "--train_data_dir", args.data, "--resolution", str(args.resolution), "--max_train_steps",
              str(args.steps), "--validation_steps", str(args.steps + 1), "--seed", str(args.seed),
              "--noise_eval_levels", str(args.levels)]
    noise_flags = ["--noise_augment", args.noise]
    if args.noise == "ve":
        noise_flags += ["--sigma_min", str(args.sigma_min)]
    seconds = {}
    for name, extra in (("clean", []), ("noise-aware", noise_flags)):
        start = time.perf_counter()
        train_expert.main(train_expert.parse_args([*common, "--output_dir", str(output / name), *extra]))
        seconds[name] = time.perf_counter() - start

    # The clean expert judged on the noise-aware expert's levels, noise and held-out images.
    aware = FrozenExpert.from_pretrained(str(output / "noise-aware"))
    args_for_split = train_expert.parse_args([*common, "--output_dir", str(output / "clean")])
    validation_loader, num_classes = held_out_loader(args_for_split)
    clean_model = train_expert.ResNetForImageClassification.from_pretrained(output / "clean").eval()
    clean_encoder = PooledImageEncoder.for_saved_model(clean_model.resnet, str(output / "clean"))
    clean_accuracy = [train_expert.evaluate(clean_model, clean_encoder, validation_loader, "cpu", num_classes,
                                            aware.noise, sigma, args.seed)["accuracy"]
                      for sigma in aware.accuracy.sigmas]
    clean_report = json.loads((output / "clean" / "validation.json").read_text())
    aware_report = json.loads((output / "noise-aware" / "validation.json").read_text())
    margin = 0.1
    print(f"{args.steps} steps each at {args.resolution} px; noise {aware.noise.to_dict()}; held-out images "
          f"{sum(map(sum, aware_report['confusion_matrix']))}; chance (majority class) {aware.accuracy.chance:.3f}")
    print(f"clean accuracy: clean expert {clean_report['accuracy']:.3f}, noise-aware expert "
          f"{aware_report['accuracy']:.3f}; training s: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print("| sigma (VE-equivalent) | clean expert | noise-aware expert | alignment weight (margin 0.1) |")
    print("|---|---|---|---|")
    weights = aware.accuracy.weights(torch.tensor(aware.accuracy.sigmas), margin).tolist()
    for sigma, clean, noisy, weight in zip(aware.accuracy.sigmas, clean_accuracy, aware.accuracy.accuracies, weights):
        print(f"| {sigma:.3g} | {clean:.3f} | {noisy:.3f} | {weight:.2f} |")
    (output / "results.json").write_text(json.dumps({
        "args": vars(args), "sigmas": aware.accuracy.sigmas, "clean_expert": clean_accuracy,
        "noise_aware_expert": aware.accuracy.accuracies, "chance": aware.accuracy.chance, "weights": weights,
        "seconds": seconds}, indent=2))


def held_out_loader(args):
    """The held-out split ``train_expert`` validated on, as its loader (same seed, same fraction)."""
    from medsyn.training.script_args import load_training_data, split_validation

    dataset, _ = load_training_data(args, require_labels=True)
    train_set, validation_set = split_validation(dataset, args.validation_fraction, args.seed)
    _, loader = train_expert.labelled_loaders(args, train_set, validation_set)
    return loader, len(dataset.features["label"].names)


if __name__ == "__main__":
    main()
