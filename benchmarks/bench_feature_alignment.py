"""Feature-aligned vs plain score-Langevin training on a real labelled set: generation accuracy, diversity, and the
training-step overhead of alignment.

1. An expert ResNet is trained on the set, noise-aware by default (``--expert-noise ve``), or ``--expert`` names one;
   its held-out accuracy per noise level is printed.
2. For each training seed, a baseline and an aligned class-conditional score model train with the same seed, data,
   steps and recipe (the ``medsyn demo`` one, which gives recognisable 32 px samples on a CPU).
3. Both are judged with the same evaluation seeds (``medsyn evaluate-expert``'s paired design) by a *judge*: a
   second classifier, trained on clean images with another seed (or ``--judge``), so that the aligned model is not
   graded by the features it was trained to match. The gain is paired per training seed and pooled over them with
   a t-interval.
4. The step overhead is timed apart, in one process, alternating plain and aligned optimiser steps on one UNet
   at ``--overhead-resolution`` (target <= 25% at 64 px; ``--overhead-repeats 0`` skips it).

Every stage resumes: a finished classifier or model in ``--output-dir`` is kept, a cut training run goes on from
its newest checkpoint (resume-exact), and a model's judged evaluation is stored beside it, so an hour-long grid
can stop and restart, and processes can split it by ``--train-seeds`` or ``--variants`` once the expert and judge
exist. A last run over all seeds then reads everything back and prints the table.

A grid longer than the machine's life (a scratch disk wiped between sessions) goes on elsewhere with ``--records``:
a small folder kept with the results, where each judged model leaves its evaluation, its training seconds and the
SHA-256 of the judge (and, for an aligned model, the expert) it depends on. A later run that retrains the expert
and judge to the same weights (same data, seeds, torch and thread count: run it with ``OMP_NUM_THREADS=1``) reads
those models back instead of training them again, and refuses, naming the difference, a record made otherwise.

    python benchmarks/bench_feature_alignment.py \\
        --data ../shared/data/brain_tumor_mri/brain_tumor_mri_4class_128.npz --output-dir /tmp/bench-fa
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from medsyn.evaluation.generation_accuracy import ExpertClassifier, generation_accuracy, paired_difference
from medsyn.metrics.features import PooledImageEncoder
from medsyn.models.score_unet import build_score_unet
from medsyn.output_files import write_text_atomically
from medsyn.pipelines import load_pipeline
from medsyn.train_scripts import train_expert, train_score_langevin
from medsyn.training.dsm_loss import dsm_loss, per_value_scale
from medsyn.training.expert_noise import ExpertNoise, NoiseProcess
from medsyn.training.feature_alignment import FeatureAligner, FrozenExpert, block_channels

SCORE_RECIPE = [  # medsyn demo's recipe
    "--base_channels", "32", "--channel_mult", "1", "2", "2", "--layers_per_block", "1", "--norm_num_groups", "8",
    "--class_conditional", "--use_ema", "--ema_decay", "0.995", "--train_batch_size", "32", "--learning_rate", "1e-3",
    "--lr_warmup_steps", "50", "--num_noise_levels", "40", "--sigma_min", "0.05", "--n_steps_each", "6",
    "--report_to", "none", "--num_validation_images", "4",
]
EXPERT_RECIPE = ["--embedding_size", "16", "--hidden_sizes", "32", "64", "128", "--depths", "1", "1", "1",
                 "--layer_type", "basic", "--train_batch_size", "64", "--learning_rate", "1e-3", "--augment",
                 "--report_to", "none"]
VARIANTS = ("baseline", "aligned")
TIMING_FILE = "bench_timing.json"  # beside a trained model: its training seconds
EVALUATION_FILE = "bench_evaluation.json"  # beside a trained model: its judged evaluation and the settings used


def resumable(args, steps: int) -> list[str]:
    """Training flags that checkpoint every ``--checkpoint-every`` steps and go on from the newest checkpoint."""
    return ["--max_train_steps", str(steps), "--validation_steps", str(steps + 1),
            "--checkpointing_steps", str(args.checkpoint_every), "--resume_from_checkpoint", "latest"]


def weights_digest(folder: str) -> str:
    """SHA-256 over a saved model's safetensors files: the same weights give the same digest wherever they lie."""
    digest = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no .safetensors weights to identify the model by")
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def recipe(args, variant: str, seed: int, expert_digest: str) -> dict:
    """What a model's training depended on: a record made with anything else is not this model."""
    made = {"data": str(Path(args.data).resolve()), "resolution": args.resolution, "train_steps": args.train_steps,
            "seed": seed}
    if variant == "aligned":  # the weight against the per-value MSE (records without this key were per image sum)
        made |= {"align_weight": args.align_weight, "align_weight_against": "per-value MSE",
                 "expert_sha256": expert_digest}
    return made


def recorded(args, variant: str, seed: int, made: dict, settings: dict) -> dict | None:
    """The run read back from ``--records``, or None where it holds none; a record of another recipe, judge or
    evaluation is refused by name, never mixed in or overwritten."""
    path = Path(args.records) / f"{variant}-seed{seed}.json" if args.records else None
    if path is None or not path.exists():
        return None
    record = json.loads(path.read_text())
    differs = [f"{key} {record[part].get(key)!r} (here {wanted!r})"
               for part, expected in (("recipe", made), ("settings", settings))
               for key, wanted in expected.items() if record[part].get(key) != wanted]
    if differs:
        raise ValueError(f"{path} was made otherwise ({'; '.join(differs)}): retrain the expert and judge as the "
                         f"record says (torch {record['torch']}, OMP_NUM_THREADS=1), or give another --records")
    return {"path": str(path), "seconds": record["seconds"], "resumed": record["resumed"], "recipe": made,
            "evaluation": record["evaluation"]}


def write_record(args, variant: str, seed: int, run: dict, settings: dict) -> None:
    """Keep a judged model's outcome in ``--records``, without its weights."""
    folder = Path(args.records)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / f"{variant}-seed{seed}.json", json.dumps(
        {"recipe": run["recipe"], "settings": settings, "torch": torch.__version__, "seconds": run["seconds"],
         "resumed": run["resumed"], "evaluation": run["evaluation"]}, indent=1))


def train(args, out: Path, variant: str, seed: int, expert: str) -> dict:
    """One model trained, resumed or read back from its folder. ``seconds`` of a resumed run count only the steps
    after the checkpoint (``resumed`` says so)."""
    summary = out / "training_summary.json"
    if summary.exists() and (steps := json.loads(summary.read_text())["train_steps"]) != args.train_steps:
        raise ValueError(f"{out} holds a model trained for {steps} steps, not --train-steps "
                         f"{args.train_steps}: give another --output-dir")
    if not (out / "model_index.json").exists():
        extra = ["--align_expert", expert, "--align_weight", str(args.align_weight)] if variant == "aligned" else []
        resumed = any(out.glob("checkpoint-*"))
        start = time.perf_counter()
        train_score_langevin.main(train_score_langevin.parse_args([
            *SCORE_RECIPE, "--train_data_dir", args.data, "--resolution", str(args.resolution),
            *resumable(args, args.train_steps), "--seed", str(seed), "--output_dir", str(out), *extra]))
        write_text_atomically(out / TIMING_FILE, json.dumps({"seconds": time.perf_counter() - start,
                                                             "resumed": resumed}))
    timing = json.loads((out / TIMING_FILE).read_text()) if (out / TIMING_FILE).exists() else {}
    return {"path": str(out), "seconds": timing.get("seconds"), "resumed": timing.get("resumed", False)}


def judged(run: dict, judge: ExpertClassifier, settings: dict, args) -> dict:
    """The run's generation accuracy by the judge, read back when it was stored with the same judge and settings."""
    stored = Path(run["path"]) / EVALUATION_FILE
    if stored.exists():
        record = json.loads(stored.read_text())
        if record["settings"] == settings:
            return record["evaluation"]
    pipeline = load_pipeline(run["path"])
    pipeline.set_progress_bar_config(disable=True)
    evaluation = generation_accuracy(pipeline, judge, args.per_class, args.eval_seeds,
                                     guidance_scale=args.guidance_scale)
    write_text_atomically(stored, json.dumps({"settings": settings, "evaluation": evaluation}))
    return evaluation


def train_and_judge(args, expert: str, judge: ExpertClassifier, settings: dict) -> dict[str, list[dict]]:
    """Each ``--variants`` model per training seed, read back from ``--records``, or trained and judged at once (and
    recorded), so that a run cut part-way loses at most the model in hand."""
    runs: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    expert_digest = weights_digest(expert)
    for seed in args.train_seeds:
        for variant in runs:
            made = recipe(args, variant, seed, expert_digest)
            if not (run := recorded(args, variant, seed, made, settings)):
                run = train(args, Path(args.output_dir) / f"{variant}-seed{seed}", variant, seed, expert)
                run |= {"recipe": made, "evaluation": judged(run, judge, settings, args)}
                if args.records:
                    write_record(args, variant, seed, run, settings)
            runs[variant].append(run)
    return runs


def resnet50_expert() -> FrozenExpert:
    """ResNet50's architecture (the paper's expert) with random weights: timing does not depend on them."""
    from transformers import ResNetConfig, ResNetModel

    return FrozenExpert(PooledImageEncoder(ResNetModel(ResNetConfig(num_channels=1)), [0.5], [0.5]))


def step_overhead(expert: FrozenExpert, resolution: int, batch: int, repeats: int) -> dict:
    """Median time of a plain and an aligned training step of one UNet, alternating, and their ratio. The expert
    sees the full-size input, as an expert trained at this resolution would."""
    torch.manual_seed(0)
    unet = build_score_unet(sample_size=resolution, in_channels=1, num_classes=4, base_channels=32,
                            channel_mult=(1, 2, 2), layers_per_block=1, norm_num_groups=8)
    expert = FrozenExpert(expert.encoder, image_size=None)
    clean = torch.rand(batch, 1, resolution, resolution) * 2 - 1
    sigma, labels = torch.full((batch,), 0.5), torch.zeros(batch, dtype=torch.long)
    width = block_channels(unet, "down_blocks.-1", clean[:1], timestep=sigma[:1], class_labels=labels[:1])
    model_noise = ExpertNoise(NoiseProcess.VE, sigma_min=0.01, sigma_max=50.0)
    aligner = FeatureAligner(expert, unet, "down_blocks.-1", width, model_noise, resolution)
    optimizer = torch.optim.AdamW(list(unet.parameters()) + list(aligner.head.parameters()), lr=1e-4)

    def step(aligned: bool) -> float:
        start = time.perf_counter()
        noise = torch.randn_like(clean)
        noisy = clean + sigma.view(-1, 1, 1, 1) * noise
        loss = dsm_loss(unet(noisy, sigma, class_labels=labels).sample, noise, sigma).mean()
        if aligned:
            loss = loss + 0.1 * per_value_scale(clean) * aligner.loss(noisy, sigma)  # as the score script adds it
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    step(False), step(True)  # warm-up
    plain, aligned = [], []
    for _ in range(repeats):
        plain.append(step(False))
        aligned.append(step(True))
    return {"plain_s": statistics.median(plain), "aligned_s": statistics.median(aligned),
            "overhead": statistics.median(a / p for a, p in zip(aligned, plain)) - 1}


def pooled_gain(pairs: list[dict]) -> dict | None:
    """Mean of the per-training-seed paired gains with a 95% t-interval (None for fewer than two seeds)."""
    gains = [pair["accuracy_difference_mean"] for pair in pairs]
    if len(gains) < 2:
        return None
    from scipy import stats

    mean, half = statistics.fmean(gains), stats.t.ppf(0.975, len(gains) - 1) * stats.sem(gains)
    return {"gains": gains, "mean": mean, "low": mean - half, "high": mean + half}


def seconds(run: dict) -> str:
    """A run's training seconds for the table; those of a resumed run are marked, as they miss the cut part."""
    if run["seconds"] is None:
        return "?"
    return f"{run['seconds']:.0f}" + (" (resumed)" if run["resumed"] else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a labelled image folder, manifest or .npz")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--expert", help="an expert folder; default: train one here")
    parser.add_argument("--expert-noise", choices=("ve", "none"), default="ve",
                        help="train the alignment expert on the score model's noise (ve) or on clean images")
    parser.add_argument("--judge", help="the classifier that grades generated images; default: train one here")
    parser.add_argument("--expert-steps", type=int, default=600)
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="only these models per seed: two processes can train a seed's pair side by side")
    parser.add_argument("--align-weight", type=float, default=0.1)
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--overhead-resolution", type=int, default=64)
    parser.add_argument("--overhead-batch", type=int, default=16)
    parser.add_argument("--overhead-repeats", type=int, default=10, help="0 skips the overhead timing")
    parser.add_argument("--checkpoint-every", type=int, default=250,
                        help="training steps between checkpoints, from which a cut run resumes")
    parser.add_argument("--records", help="a durable folder for each judged model's outcome, read back by later "
                                          "runs on another machine (see above)")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    def classifier(name: str, seed: int, *extra: str) -> str:
        path = output_dir / name
        if not (path / "validation.json").exists():  # written once the classifier is saved
            train_expert.main(train_expert.parse_args([
                *EXPERT_RECIPE, "--train_data_dir", args.data, "--resolution", str(args.resolution),
                *resumable(args, args.expert_steps), "--seed", str(seed), "--output_dir", str(path), *extra]))
        return str(path)

    noise = ["--noise_augment", "ve", "--sigma_min", "0.05"] if args.expert_noise == "ve" else []
    expert = args.expert or classifier("expert", 0, *noise)
    judge_path = args.judge or classifier("judge", 100)
    expert_report, judge_report = (json.loads((Path(p) / "validation.json").read_text())
                                   if (Path(p) / "validation.json").is_file() else {} for p in (expert, judge_path))
    settings = {"judge_sha256": weights_digest(judge_path), "per_class": args.per_class,
                "eval_seeds": list(args.eval_seeds), "guidance_scale": args.guidance_scale}
    judge = ExpertClassifier.from_pretrained(judge_path)
    results = train_and_judge(args, expert, judge, settings)
    pairs = [paired_difference(baseline["evaluation"], aligned["evaluation"])
             for baseline, aligned in zip(results.get("baseline", []), results.get("aligned", []))]
    overhead = {
        name: step_overhead(judge_expert, args.overhead_resolution, args.overhead_batch, args.overhead_repeats)
        for name, judge_expert in (("trained expert", FrozenExpert.from_pretrained(expert)),
                                   ("ResNet50 architecture", resnet50_expert()))
    } if args.overhead_repeats else {}
    pooled = pooled_gain(pairs)
    (output_dir / "results.json").write_text(json.dumps(
        {"args": vars(args), "expert": expert_report, "judge": judge_report, "runs": results, "paired": pairs,
         "pooled": pooled, "overhead": overhead}, indent=2))

    print(f"alignment expert: held-out accuracy {expert_report.get('accuracy', float('nan')):.3f}; judge "
          f"{judge_report.get('accuracy', float('nan')):.3f}; classes {judge.class_names}")
    if "noise_accuracy" in expert_report:
        table = expert_report["noise_accuracy"]
        print(f"alignment expert's accuracy per noise level (chance {table['chance']:.3f}): " + ", ".join(
            f"sigma {s:.3g}: {a:.3f}" for s, a in zip(table["sigmas"], table["accuracies"])))
    print(f"{args.train_steps} steps per model at {args.resolution} px; {len(args.eval_seeds)} evaluation seeds x "
          f"{args.per_class} images per class; guidance {args.guidance_scale}")
    print("| model | train seed | generation accuracy (mean +- sd over eval seeds) | per-class accuracy | "
          "per-class MS-SSIM | train s |")
    print("|---|---|---|---|---|---|")
    for variant, variant_runs in results.items():
        for seed, run in zip(args.train_seeds, variant_runs):
            ev = run["evaluation"]
            matrix = np.array(ev["confusion_matrix"])
            per_class = " / ".join(f"{v:.2f}" for v in np.diag(matrix) / matrix.sum(1))
            diversity = ", ".join(f"{k} {v:.3f}" for k, v in ev["ms_ssim_per_class"].items())
            print(f"| {variant} | {seed} | {ev['accuracy_mean']:.3f} +- {ev['accuracy_std']:.3f} | {per_class} | "
                  f"{diversity} | {seconds(run)} |")
    for seed, pair in zip(args.train_seeds, pairs):
        print(f"aligned - baseline (train seed {seed}, paired over eval seeds): "
              f"{pair['accuracy_difference_mean']:+.3f} +- {pair['accuracy_difference_std']:.3f}")
    if pooled:
        print(f"aligned - baseline over {len(pairs)} training seeds: {pooled['mean']:+.3f}, 95% CI "
              f"[{pooled['low']:+.3f}, {pooled['high']:+.3f}]")
    for name, timing in overhead.items():
        print(f"step time at {args.overhead_resolution} px, batch {args.overhead_batch}, {name}: plain "
              f"{timing['plain_s']:.3f} s, aligned {timing['aligned_s']:.3f} s, overhead {timing['overhead']:+.1%} "
              f"(target <= +25%)")


if __name__ == "__main__":
    main()
