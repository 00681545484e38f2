"""The low-data case study end to end: does medsyn's synthetic data help a classifier when real scans are scarce?

For each real-data fraction of the training split and each seed: train a class-conditional DDPM on exactly that
fraction, generate 4x its count per class, audit the synthetic images against the fraction, then train the same
classifier on every arm of ``medsyn.evaluation.low_data_study`` and score all arms on the same bootstrap
resamples of the cleaned test split. Every stage writes its result under ``--output-dir`` and is skipped when it is
there, so a run stopped at any point continues where it stopped (the CPU runs take hours).

The generator is the class-conditional DDPM (``train_ddpm.py``) sampled by DPM-Solver++ 2M: on real brain MRI at
32 px it beat the score model at equal network evaluations (FID 94 against 155 at 20 NFE, probe distance 4.4
against 6.2; RESULTS.md, issue 13's fourth measurement). The solver's stochastic (SDE) form is the default: on a
generator trained on 5% of the data the deterministic one left noise and blown-out images at 10 and 50 steps,
which the SDE form at 10 steps and ancestral DDPM sampling at 200 did not.

    # brain MRI at 32 px on a CPU (hours: run in the background)
    python benchmarks/study_low_data.py --data ../shared/data/brain_tumor_mri/brain_tumor_mri_4class_128.npz \\
        --resolution 32 --fractions 0.05 0.1 0.25 --seeds 0 1 2 --output-dir study-brain32
    # fundus photographs (RGB), folder with labels.csv
    python benchmarks/study_low_data.py --data ../shared/data/fundus_eye_disease --resolution 32 \\
        --negative-class normal --output-dir study-fundus32

The report (``report.md``, ``results.json``, ``auc_vs_fraction.png``) is rewritten after every finished run, from
every finished run in the folder: runs of one study can go to separate processes or GPUs (``--fractions`` and
``--seeds`` pick theirs) and the last to finish writes the whole report.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler

from medsyn.evaluation.low_data_study import (
    Arm,
    arm_metrics,
    class_probabilities,
    clean_test_split,
    gain_over_seeds,
    paired_bootstrap,
    paired_gain,
    stratified_fraction,
    study_arms,
    synthetic_counts,
    train_arm,
)
from medsyn.output_files import write_npz_atomically, write_text_atomically

GENERATOR_RECIPE = [  # RESULTS.md's 32 px DDPM recipe (issue 13), with the small-data affine augmentation
    "--base_channels", "32", "--channel_mult", "1", "2", "2", "--layers_per_block", "1", "--norm_num_groups", "8",
    "--class_conditional", "--use_ema", "--ema_decay", "0.999", "--train_batch_size", "32",
    "--learning_rate", "1e-3", "--lr_warmup_steps", "50", "--augment", "--report_to", "none",
    "--checkpointing_steps", "500", "--checkpoints_total_limit", "1", "--num_validation_images", "2",
]


def resized(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 (N, H, W[, C]) at ``resolution`` (area averaging), in the same layout."""
    if images.shape[1] == resolution:
        return images
    tensor = torch.from_numpy(images).float()
    tensor = tensor[:, None] if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    small = F.interpolate(tensor, size=(resolution, resolution), mode="area").round().clamp(0, 255).byte()
    return (small[:, 0] if images.ndim == 3 else small.permute(0, 2, 3, 1)).numpy()


def load_dataset(spec: str, resolution: int) -> dict:
    """The training and testing splits of a medsyn NPZ (with a ``split`` array) or of a labelled folder (a
    seeded 80/20 split), at ``resolution``."""
    path = Path(spec)
    if path.suffix == ".npz":
        with np.load(path) as archive:
            images, labels, split = archive["images"], archive["labels"].astype(np.int64), archive["split"]
            names = [str(n) for n in archive["class_names"]]
        train = split == "training"
    else:
        from medsyn.data import load_image_dataset

        dataset = load_image_dataset(path)
        images = np.stack([np.asarray(image.resize((resolution, resolution))) for image in dataset["image"]])
        labels, names = np.array(dataset["label"], dtype=np.int64), dataset.features["label"].names
        train = np.random.default_rng(0).permutation(len(images)) >= len(images) // 5
    images = resized(images, resolution)
    return {"train": images[train], "train_labels": labels[train], "test": images[~train],
            "test_labels": labels[~train], "class_names": names}


def timed(record: dict, stage: str):
    """A context that adds the seconds of ``stage`` to ``record["seconds"]``."""

    class _Clock:
        def __enter__(self):
            self.started = time.perf_counter()

        def __exit__(self, *_):
            record.setdefault("seconds", {})[stage] = round(time.perf_counter() - self.started, 1)

    return _Clock()


def train_generator(train_file: Path, output: Path, args, seed: int) -> None:
    from medsyn.train_scripts.train_ddpm import main as train
    from medsyn.train_scripts.train_ddpm import parse_args

    train(parse_args(GENERATOR_RECIPE + shlex.split(args.generator_args) + [
        "--train_data_dir", str(train_file), "--resolution", str(args.resolution), "--seed", str(seed),
        "--max_train_steps", str(args.generator_steps), "--validation_steps", str(args.generator_steps + 1),
        "--output_dir", str(output), "--resume_from_checkpoint", "latest",
    ]))


def generate(model: Path, counts: list[int], args, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``counts[c]`` images of class c, image i of class c drawn from (seed, c, i), class by class."""
    from medsyn.generation import ImageKey, SamplingSettings, sample_image_set
    from medsyn.pipelines import load_pipeline

    pipe = load_pipeline(model).to("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type=args.sampler)
    settings = SamplingSettings(guidance_scale=args.guidance_scale, num_inference_steps=args.sampling_steps)
    keys = [ImageKey(seed * 100 + c, i, class_label=c) for c, count in enumerate(counts) for i in range(count)]
    return sample_image_set(pipe, keys, settings, args.batch_size), np.array([k.class_label for k in keys])


def feature_key(images: np.ndarray) -> tuple:
    """What the feature cache knows an image set by: its shape and content."""
    return images.shape, hash(images.tobytes())


def inception_features(inception, images: np.ndarray, cache: dict) -> torch.Tensor:
    """Features of uint8 ``images`` (N, H, W) or (N, H, W, C), computed once per process for each distinct set."""
    from medsyn.metrics.features import extract_features

    key = feature_key(images)
    if key not in cache:
        tensor = torch.from_numpy(images)
        tensor = tensor[:, None] if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
        cache[key] = extract_features(tensor.contiguous(), inception, batch_size=64)
    return cache[key]


def stored_test_features(inception, test: np.ndarray, output: Path, cache: dict) -> None:
    """The cleaned test split's features into ``cache``, from ``output``'s copy, made by the first run that needs
    them: every run scores against the same test split, which costs as much to encode as a run's own images."""
    stored = output / "test_inception_features.npz"
    if not stored.exists():
        write_npz_atomically(stored, features=inception_features(inception, test, {}).numpy())
    with np.load(stored) as archive:
        cache[feature_key(test)] = torch.from_numpy(archive["features"])


def inception_fid(inception, a: np.ndarray, b: np.ndarray, cache: dict) -> float:
    from medsyn.metrics import frechet_distance

    return frechet_distance(inception_features(inception, a, cache), inception_features(inception, b, cache))


def test_probabilities(arm: Arm, data: dict, args, seed: int) -> np.ndarray:
    """The study's classifier (its steps, batch size and learning rate) trained on ``arm`` with ``seed``: its class
    probabilities on the cleaned test split."""
    classifier = train_arm(arm, len(data["class_names"]), args.classifier_steps, args.classifier_batch_size,
                           args.classifier_learning_rate, seed)
    return class_probabilities(classifier, data["test"]).numpy()


def run_one(data: dict, fraction: float, seed: int, args, folder: Path, inception, feature_cache: dict) -> dict:
    """One (fraction, seed): every stage, each skipped when its output is there."""
    folder.mkdir(parents=True, exist_ok=True)
    record_file = folder / "run.json"
    record = json.loads(record_file.read_text()) if record_file.exists() else {"fraction": fraction, "seed": seed}
    if "arms" in record:
        return record
    names, negative = data["class_names"], data["negative_class"]
    indices = stratified_fraction(data["train_labels"], fraction, seed)
    real, real_labels = data["train"][indices], data["train_labels"][indices]
    train_file = folder / "train.npz"  # exactly the fraction: the generator sees nothing else
    if not train_file.exists():
        write_npz_atomically(train_file, images=real, labels=real_labels, class_names=np.array(names),
                             indices=indices)
    record["real_images"] = len(real)

    model = folder / "generator"
    if not (model / "model_index.json").exists():
        with timed(record, "generator training"):
            train_generator(train_file, model, args, seed)
    synthetic_file = folder / "synthetic.npz"
    if not synthetic_file.exists():
        counts = synthetic_counts(real_labels, len(names), max(args.multiples))
        with timed(record, "generation"):
            synthetic, synthetic_labels = generate(model, counts, args, seed)
        write_npz_atomically(synthetic_file, images=synthetic, labels=synthetic_labels, class_names=np.array(names))
    with np.load(synthetic_file) as archive:
        synthetic, synthetic_labels = archive["images"], archive["labels"]

    if "audit" not in record:
        from medsyn.privacy import memorisation_audit

        with timed(record, "audit"):
            audit = memorisation_audit(synthetic, real, held_out=data["test"])
        record["audit"] = {"passed": audit.passed, "verdict": audit.verdict,
                           "near_copies": len(audit.near_copy_indices), "min_distance": audit.min_distance}
    if inception is not None and "fid" not in record:
        with timed(record, "FID"):
            n = len(real)
            record["fid"] = {"synthetic_vs_test": inception_fid(inception, synthetic[:n], data["test"], feature_cache),
                             "real_fraction_vs_test": inception_fid(inception, real, data["test"], feature_cache),
                             "images": n}

    with timed(record, "classifiers"):
        arms = study_arms(real, real_labels, synthetic, synthetic_labels, tuple(args.multiples), seed)
        probabilities = {}
        for arm in arms:
            probabilities[arm.name] = test_probabilities(arm, data, args, seed)
    metrics = {name: arm_metrics(p, data["test_labels"], negative) for name, p in probabilities.items()}
    boot = paired_bootstrap(probabilities, data["test_labels"], negative, args.resamples, seed)
    record["arms"] = {}
    for name, m in metrics.items():
        entry = {"auc": m.auc, "accuracy": m.accuracy, "recall": dict(zip(names, m.recall, strict=True)),
                 "train_images": int(len(next(a for a in arms if a.name == name).images))}
        for reference in ("real", "real + classic augmentation"):
            if name != reference:
                key = "vs_" + reference.replace(" + ", "_plus_").replace(" ", "_")
                entry[key] = {"auc": paired_gain(m.auc - metrics[reference].auc, boot, name, reference, 0),
                              "accuracy": paired_gain(m.accuracy - metrics[reference].accuracy, boot, name,
                                                      reference, 1)}
        record["arms"][name] = entry
    write_text_atomically(record_file, json.dumps(record, indent=2))
    return record


def add_classifier_noise(record: dict, folder: Path, data: dict, args) -> None:
    """Retrain the real-only arm on the run's own images with classifier seeds 0..N-1 (the study's classifier used
    the run's seed, so it is among them when the seed is below N): how far the test AUC moves with the classifier's
    seed alone. The bootstrap CIs see only the test set's noise, not this."""
    with np.load(folder / "train.npz") as archive:
        real = Arm("real", archive["images"], archive["labels"])
    aucs, accuracies = [], []
    with timed(record, "classifier noise"):
        for classifier_seed in range(args.classifier_noise):
            m = arm_metrics(test_probabilities(real, data, args, classifier_seed), data["test_labels"],
                            data["negative_class"])
            aucs.append(m.auc)
            accuracies.append(m.accuracy)
    record["classifier_noise"] = {"classifier_seeds": list(range(args.classifier_noise)), "auc": aucs,
                                  "accuracy": accuracies}
    write_text_atomically(folder / "run.json", json.dumps(record, indent=2))


def seed_cell(gains: list[dict]) -> str:
    """A report cell: mean gain over seeds, its t-interval over seeds, and the seeds significant on their own."""
    pooled = gain_over_seeds([g["gain"] for g in gains])
    interval = "" if pooled["ci"] is None else " ({:+.3f}, {:+.3f})".format(*pooled["ci"])
    marked = f"**{pooled['gain']:+.3f}**" if pooled["excludes_zero"] else f"{pooled['gain']:+.3f}"
    return f"{marked}{interval} [{sum(g['ci'][0] > 0 for g in gains)} of {len(gains)}]"


def write_report(finished: list[dict], data: dict, args, output: Path) -> None:
    """results.json, report.md (mean over seeds per fraction and arm) and auc_vs_fraction.png of finished runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_text_atomically(output / "results.json", json.dumps({"cleaning": data["cleaning"], "runs": finished},
                                                              indent=2))
    fractions = sorted({r["fraction"] for r in finished})
    arm_names = list(finished[0]["arms"]) if finished else []
    lines = [f"# Low-data study: {args.data} at {args.resolution} px", "",
             f"Test split: {data['cleaning']['kept']} images kept, {data['cleaning']['removed']} removed as "
             "near-copies of training slices. Classifier: the downstream ResNet, "
             f"{args.classifier_steps} steps; AUC tumour vs none. Each run's gains are paired over {args.resamples} "
             "bootstrap resamples of the test set (95% CI). A gain cell: the mean over seeds, its 95% Student-t "
             "interval over seeds (from 2 seeds; bold where it excludes 0), and [k of n] the seeds whose own CI "
             "lies above 0.", ""]
    for fraction in fractions:
        group = [r for r in finished if r["fraction"] == fraction]
        lines += [f"## {fraction:.0%} of the training split ({group[0]['real_images']} images), seeds "
                  f"{[r['seed'] for r in group]}", "",
                  "| arm | AUC | accuracy | recall " + " / ".join(data["class_names"]) + " | AUC gain vs real (95% CI "
                  "over seeds) [seeds with CI > 0] | AUC gain vs classic augmentation |",
                  "|---|---|---|---|---|---|"]
        for name in arm_names:
            auc = [r["arms"][name]["auc"] for r in group]
            accuracy = [r["arms"][name]["accuracy"] for r in group]
            cells = []
            for key in ("vs_real", "vs_real_plus_classic_augmentation"):
                gains = [r["arms"][name][key]["auc"] for r in group if key in r["arms"][name]]
                cells.append("" if not gains else seed_cell(gains))
            recall = " / ".join(f"{np.mean([r['arms'][name]['recall'][c] for r in group]):.2f}"
                                for c in data["class_names"])
            lines.append(f"| {name} | {np.mean(auc):.3f} ± {np.std(auc):.3f} | {np.mean(accuracy):.3f} | {recall} | "
                         f"{cells[0]} | {cells[1]} |")
        audits = [r["audit"]["passed"] for r in group]
        lines += ["", f"Audit: {sum(audits)} of {len(audits)} synthetic sets pass (no memorised images)."]
        fids = [r["fid"] for r in group if "fid" in r]
        if fids:
            lines.append(f"FID against the test split: synthetic {np.mean([f['synthetic_vs_test'] for f in fids]):.1f}"
                         f", the real fraction itself {np.mean([f['real_fraction_vs_test'] for f in fids]):.1f} "
                         f"(same count, {fids[0]['images']} images).")
        noise = [r for r in group if "classifier_noise" in r]
        if noise:
            lines.append("The classifier's own noise (real only, the same images, classifier seeds 0 to "
                         f"{len(noise[0]['classifier_noise']['auc']) - 1}): test AUC " + "; ".join(
                             f"seed {r['seed']} {np.mean(a):.3f} ± {np.std(a, ddof=1):.3f} ({min(a):.3f} to "
                             f"{max(a):.3f})" for r in noise for a in [r["classifier_noise"]["auc"]]) + ".")
        seconds = {}
        for r in group:
            for stage, value in r.get("seconds", {}).items():
                seconds.setdefault(stage, []).append(value)
        lines += ["Mean seconds per run: " + ", ".join(f"{k} {np.mean(v):.0f}" for k, v in seconds.items()), ""]
    write_text_atomically(output / "report.md", "\n".join(lines) + "\n")
    if fractions:
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for name in arm_names:
            means = [np.mean([r["arms"][name]["auc"] for r in finished if r["fraction"] == f]) for f in fractions]
            spreads = [np.std([r["arms"][name]["auc"] for r in finished if r["fraction"] == f]) for f in fractions]
            axis.errorbar([100 * f for f in fractions], means, yerr=spreads, marker="o", capsize=3, label=name)
        axis.set(xscale="log", xlabel="real training images used (% of the split)", ylabel="test AUC, tumour vs none",
                 title=f"{Path(args.data).name}, {args.resolution} px")
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(output / "auc_vs_fraction.png", dpi=120)
        plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a medsyn NPZ with a split array, or a labelled image folder")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--negative-class", default="notumor", help="the class the AUC's negatives are")
    parser.add_argument("--generator-steps", type=int, default=2000)
    parser.add_argument("--generator-args", default="",
                        help="more train_ddpm.py flags, after the 32 px recipe (the last of a repeated flag wins), "
                             "e.g. a larger UNet at 128 px")
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4],
                        help="synthetic images added, as multiples of the real count per class")
    parser.add_argument("--sampler", choices=("sde-dpmsolver++", "dpmsolver++"), default="sde-dpmsolver++",
                        help="DPM-Solver++ 2M, stochastic (SDE) or deterministic; the deterministic one left "
                             "noise in a small-data generator's images (RESULTS.md)")
    parser.add_argument("--sampling-steps", type=int, default=10, help="solver steps (2 NFE each with guidance)")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=64, help="images per generation batch")
    parser.add_argument("--classifier-steps", type=int, default=1000)
    parser.add_argument("--classifier-batch-size", type=int, default=32)
    parser.add_argument("--classifier-learning-rate", type=float, default=2e-3)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--classifier-noise", type=int, default=0, metavar="N",
                        help="also retrain the real-only arm with classifier seeds 0..N-1 on the same images, to "
                             "show how far the AUC moves with the classifier's seed alone (N >= 2; 0: off)")
    parser.add_argument("--no-fid", action="store_true", help="skip Inception FID (slow on a CPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.classifier_noise == 1 or args.classifier_noise < 0:
        raise SystemExit(f"--classifier-noise needs 2 or more classifier seeds (0: off), got {args.classifier_noise}")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    data_file = output / "data.npz"
    if not data_file.exists():
        data = load_dataset(args.data, args.resolution)
        kept, removed = clean_test_split(data["train"], data["test"])
        write_npz_atomically(data_file, train=data["train"], train_labels=data["train_labels"],
                             test=data["test"][kept], test_labels=data["test_labels"][kept],
                             class_names=np.array(data["class_names"]), removed=removed)
    with np.load(data_file) as archive:
        data = {key: archive[key] for key in archive.files}
    data["class_names"] = [str(n) for n in data["class_names"]]
    if args.negative_class not in data["class_names"]:
        raise SystemExit(f"--negative-class {args.negative_class!r} is not among {data['class_names']}")
    data["negative_class"] = data["class_names"].index(args.negative_class)
    data["cleaning"] = {"kept": int(len(data["test"])), "removed": int(len(data["removed"]))}
    inception = None
    if not args.no_fid:
        from medsyn.metrics.inception import FIDInceptionV3

        inception = FIDInceptionV3.from_pretrained()
    cache = {}
    if inception is not None:
        stored_test_features(inception, data["test"], output, cache)
    for fraction in args.fractions:
        for seed in args.seeds:
            folder = output / f"fraction-{fraction:g}-seed-{seed}"
            record = run_one(data, fraction, seed, args, folder, inception, cache)
            if len(record.get("classifier_noise", {}).get("auc", [])) < args.classifier_noise:
                add_classifier_noise(record, folder, data, args)
            write_report(finished_runs(output), data, args, output)
    print((output / "report.md").read_text())


def finished_runs(output: Path) -> list[dict]:
    """Every finished run under ``output``, whichever process made it (runs can go to separate GPUs)."""
    runs = [json.loads(path.read_text()) for path in output.glob("fraction-*-seed-*/run.json")]
    return sorted((r for r in runs if "arms" in r), key=lambda r: (r["fraction"], r["seed"]))


if __name__ == "__main__":
    main()
