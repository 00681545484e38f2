"""Does RLHF improve a generator as its rater judges it, without drifting from the data? (issue 15)

Runs ``train_rlhf.py``'s rounds with each update method and reward from one starting generator and one stand-in
rater (an expert classifier trained here, or given), and prints per round: the held-out mean rating of the match to
the prompt, its change from round 0 paired over the same held-out seeds (95% CI), the mean quality rating, the
Frechet distance and MS-SSIM diversity relative to round 0, the learned reward and acceptance of held-out images and
the update's cost. **Target: the mean rating rises significantly while Frechet distance and diversity stay within
10% of the starting model.** The rater is a stand-in for experts: what it rewards is an expert classifier's
confidence in the prompted class (prompt match) and in the class it sees (quality), not human judgement.

    python benchmarks/bench_rlhf.py --generator ddpm-brain32 --data training.npz --output-dir bench-rlhf \\
        --rounds 3 -- --pool_per_class 32 --held_out_per_class 32

Arguments after ``--`` go to every ``train_rlhf.py`` run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
from bench_feature_alignment import EXPERT_RECIPE
from PIL import Image
from scipy import stats

from medsyn.pipelines import load_pipeline
from medsyn.train_scripts import train_expert, train_rlhf


def real_subset(data: str, resolution: int, count: int, seed: int, path: Path) -> Path:
    """``count`` real training images resized to ``resolution`` (the generator's), with labels and class names."""
    if path.exists():
        return path
    with np.load(data, allow_pickle=False) as arrays:
        images, labels, names = arrays["images"], arrays["labels"], arrays["class_names"]
    rows = np.random.default_rng(seed).choice(len(images), min(count, len(images)), replace=False)
    resized = np.stack([np.asarray(Image.fromarray(images[i]).resize((resolution, resolution), Image.BILINEAR))
                        for i in rows])
    np.savez(path, images=resized, labels=labels[rows], class_names=names)
    return path


def paired_change(ratings: list[int], baseline: list[int]) -> tuple[float, float]:
    """Mean paired difference and its 95% t half-width."""
    differences = np.asarray(ratings, float) - np.asarray(baseline, float)
    half = stats.t.ppf(0.975, len(differences) - 1) * differences.std(ddof=1) / math.sqrt(len(differences))
    return float(differences.mean()), float(half)


def main() -> None:
    argv = sys.argv[1:]
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", required=True, help="class-conditional DDPM or score pipeline folder")
    parser.add_argument("--data", required=True, help="NPZ of the real training images (images, labels, class_names)")
    parser.add_argument("--expert", help="the stand-in rater's classifier; default: train one on --data")
    parser.add_argument("--expert-steps", type=int, default=600)
    parser.add_argument("--real-count", type=int, default=512, help="real images for mixing and the FD reference")
    parser.add_argument("--methods", nargs="+", default=[m.value for m in train_rlhf.UpdateMethod])
    parser.add_argument("--rewards", nargs="+", default=["product"], help="train_rlhf's --reward, one run each")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolution = load_pipeline(args.generator).unet.config.sample_size
    expert = args.expert or str(output_dir / "expert")
    if not args.expert and not (output_dir / "expert" / "config.json").exists():
        train_expert.main(train_expert.parse_args([
            *EXPERT_RECIPE, "--train_data_dir", args.data, "--resolution", str(resolution),
            "--max_train_steps", str(args.expert_steps), "--validation_steps", str(args.expert_steps + 1),
            "--seed", str(args.seed + 100), "--output_dir", expert]))
    real = real_subset(args.data, resolution, args.real_count, args.seed, output_dir / "real.npz")

    print(f"generator {args.generator}, stand-in rater from {expert}, {args.rounds} rounds; "
          f"train_rlhf flags: {' '.join(passthrough) or '(defaults)'}\n")
    print("| method | reward | round | mean rating | change vs round 0 (95% CI) | quality rating | FD | FD vs round 0 "
          "| MS-SSIM | MS-SSIM vs round 0 | held-out reward | held-out accept | update s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        for reward in args.rewards:
            run_dir = output_dir / f"{method}-{reward}"
            try:
                history = train_rlhf.main(train_rlhf.parse_args([
                    "--pretrained_model_name_or_path", args.generator, "--output_dir", str(run_dir),
                    "--stand_in_rater", expert, "--real_images", str(real), "--update", method, "--reward", reward,
                    "--rounds", str(args.rounds), "--seed", str(args.seed), "--report_to", "none", *passthrough]))
            except train_rlhf.RewardModelError as error:  # a result too: the reward models did not learn
                print(f"\n{method}, reward {reward}: stopped before an update. {error}\n", flush=True)
                history = [json.loads(path.read_text()) for path in sorted(run_dir.glob("round-*/metrics.json"))]
            report(method, reward, history)


def report(method: str, reward: str, history: list[dict]) -> None:
    """The table's rows of one run, then its verdict against the target."""
    start = history[0]

    def optional(metrics: dict, key: str, digits: int) -> str:
        return f"{metrics[key]:.{digits}f}" if key in metrics else "n/a"

    for metrics in history:
        change, half = paired_change(metrics["ratings"], start["ratings"])
        fd, ms_ssim = metrics["frechet_distance"], metrics["ms_ssim"]
        print(f"| {method} | {reward} | {metrics['round']} | {metrics['mean_rating']:.3f} | {change:+.3f} ± "
              f"{half:.3f} | {metrics['mean_quality_rating']:.3f} | {fd:.2f} | "
              f"{fd / start['frechet_distance'] - 1:+.1%} | {ms_ssim:.3f} | {ms_ssim / start['ms_ssim'] - 1:+.1%} | "
              f"{optional(metrics, 'held_out_mean_reward', 3)} | {optional(metrics, 'held_out_accept_rate', 2)} | "
              f"{optional(metrics, 'update_seconds', 0)} |", flush=True)
    last = history[-1]
    change, half = paired_change(last["ratings"], start["ratings"])
    within = all(abs(last[k] / start[k] - 1) <= 0.10 for k in ("frechet_distance", "ms_ssim"))
    verdict = "a significant rise" if change - half > 0 else "a significant fall" if change + half < 0 else \
        "not significant"
    print(f"\n{method}, reward {reward}: rating change {change:+.3f} ± {half:.3f} ({verdict}); FD and MS-SSIM within "
          f"10%: {within}; per class, round 0: {json.dumps(start['mean_rating_per_class'])}, last round: "
          f"{json.dumps(last['mean_rating_per_class'])}; mean update cost "
          f"{statistics.mean(m.get('update_seconds', 0) for m in history[1:]):.0f} s\n", flush=True)


if __name__ == "__main__":
    main()
