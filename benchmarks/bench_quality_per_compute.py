"""Image quality per CPU-hour: medsyn's generator recipes against two published peer recipes, side by side.

Every arm trains the same class-conditional UNet (32 px, base 32, channels x1/x2/x2, one block per level) on the
same images in the same order (seed 0), with the same batch (32) and EMA, and is checkpointed at each step budget
(default 1,000 / 3,000 / 6,000). Arms:

- ``edm``: the score model with EDM preconditioning (``--preconditioning edm``), sampled by EDM Heun.
- ``ncsn``: the score model as NCSNv2 trains it, sampled by annealed Langevin.
- ``ddpm``: medsyn's DDPM baseline (``train_ddpm.py``, lr 1e-3 with 50 warm-up steps, linear betas, epsilon).
- ``diffusers``: diffusers' ``train_unconditional.py`` recipe as published on the same UNet: lr 1e-4, cosine decay
  over the largest budget after 500 warm-up steps, AdamW weight decay 1e-6, EMA 0.9999, linear betas, epsilon.
- ``monai``: MONAI's 2D DDPM tutorial recipe: Adam lr 2.5e-5, no EMA, 1,000 linear betas 0.0015 to 0.0195,
  epsilon, MSE.

Data: the training split of a medsyn NPZ minus ``--held-out`` slices drawn from it (seed 0), which are the FID
reference: the public brain set's test split is not exchangeable with its training split (PROVENANCE.md).

Each arm is one process on one thread and resumes where it stopped: a budget whose pipeline folder is complete is
skipped, and training continues from the last checkpoint. Run two arms at a time on 2 cores:

    python benchmarks/bench_quality_per_compute.py prepare \\
        --data ../shared/data/brain_tumor_mri/brain_tumor_mri_4class_128.npz --output-dir ~/medsyn-runs/qpc-brain32
    nohup python benchmarks/bench_quality_per_compute.py train --arm edm --output-dir ~/medsyn-runs/qpc-brain32 \\
        > edm.log 2>&1 &

Each finished budget writes ``<arm>/steps-<budget>/`` (the pipeline) and a record
``benchmarks/records/quality_per_compute/<name>/<arm>-steps-<budget>.json`` (training seconds as the process's
CPU time, so a busy machine does not inflate them, wall seconds, the command).
Each model is then judged by ``bench_fast_sampling.py`` (512 images, the same per-image seeds, guidance 4, FID
against the held-out slices with the real-vs-real floor at the same n, the label probe), one line per sampler and
budget in ``eval-<arm>.jsonl`` beside the records:

    python benchmarks/bench_fast_sampling.py --model ~/medsyn-runs/qpc-brain32/edm/steps-3000 \
        --real-train ~/medsyn-runs/qpc-brain32/train.npz --real-test ~/medsyn-runs/qpc-brain32/held_out.npz \
        --fid --per-class 128 --nfe 20 35 48 --samplers Heun DPM --deterministic-heun --langevin-seeds 1 \
        --output ~/medsyn-runs/qpc-brain32/eval-edm.jsonl
    python benchmarks/bench_quality_per_compute.py report --name brain32 --figures benchmarks/figures

``report`` prints the table (arm, steps, training seconds, sampler, NFE, FID, probe agreement) and draws FID
against training seconds (each arm's best sampler) and FID against NFE (the largest budget).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "benchmarks" / "records" / "quality_per_compute"

COMMON = [  # the same UNet, batch, EMA and data order in every arm
    "--resolution", "32", "--base_channels", "32", "--channel_mult", "1", "2", "2", "--layers_per_block", "1",
    "--norm_num_groups", "8", "--class_conditional", "--train_batch_size", "32", "--seed", "0",
    "--report_to", "none", "--validation_steps", "1000000", "--num_validation_images", "2",
]
ARMS = {
    "edm": ("train_score_langevin", ["--preconditioning", "edm", "--learning_rate", "1e-3", "--lr_warmup_steps",
                                     "50", "--use_ema", "--ema_decay", "0.999"]),
    "ncsn": ("train_score_langevin", ["--learning_rate", "1e-3", "--lr_warmup_steps", "50", "--use_ema",
                                      "--ema_decay", "0.999"]),
    "ddpm": ("train_ddpm", ["--learning_rate", "1e-3", "--lr_warmup_steps", "50", "--use_ema", "--ema_decay",
                            "0.999"]),
    "diffusers": ("train_ddpm", ["--learning_rate", "1e-4", "--lr_scheduler", "cosine", "--lr_warmup_steps", "500",
                                 "--adam_weight_decay", "1e-6", "--use_ema", "--ema_decay", "0.9999"]),
    "monai": ("train_ddpm", ["--learning_rate", "2.5e-5", "--adam_weight_decay", "0", "--beta_start", "0.0015",
                             "--beta_end", "0.0195"]),
}
#: arms whose learning-rate schedule spans the whole run: its horizon is the largest budget, not each stage's
WHOLE_RUN_SCHEDULE = {"diffusers"}


def prepare(args) -> None:
    """Split the NPZ's training split into the arms' training set and the held-out FID reference."""
    out = Path(args.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with np.load(args.data) as archive:
        split = archive["split"] if "split" in archive else np.full(len(archive["labels"]), "training")
        images, labels, names = archive["images"], archive["labels"], archive["class_names"]
    train = np.flatnonzero(split == "training")
    held = np.sort(np.random.default_rng(0).choice(train, size=args.held_out, replace=False))
    kept = np.setdiff1d(train, held)
    for name, index in (("train.npz", kept), ("held_out.npz", held)):
        np.savez(out / name, images=images[index], labels=labels[index], class_names=names)
    (out / "split.json").write_text(json.dumps({
        "data": str(Path(args.data).resolve()), "held_out": args.held_out, "seed": 0,
        "train_images": int(len(kept)), "held_out_indices": held.tolist()}, indent=1))
    print(f"{len(kept)} training and {len(held)} held-out images in {out}")


def stage_argv(arm: str, out: Path, budget: int, budgets: list[int]) -> list[str]:
    """The training script's flags for one stage: train (or resume) to ``budget`` steps."""
    _, extra = ARMS[arm]
    argv = [*COMMON, *extra, "--train_data_dir", str(out / "train.npz"), "--output_dir", str(out / arm / "run"),
            "--max_train_steps", str(budget), "--checkpointing_steps", str(min(budgets)),
            "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest"]
    if arm in WHOLE_RUN_SCHEDULE:
        argv += ["--lr_schedule_steps", str(max(budgets))]
    return argv


def train(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.output_dir).expanduser()
    script_name, _ = ARMS[args.arm]
    script = __import__(f"medsyn.train_scripts.{script_name}", fromlist=["main"])
    budgets = sorted(args.budgets)
    records = RECORDS / args.name
    records.mkdir(parents=True, exist_ok=True)
    for budget in budgets:
        folder = out / args.arm / f"steps-{budget}"
        if (folder / "model_index.json").is_file():
            print(f"{args.arm}: {budget} steps already trained", flush=True)
            continue
        argv = stage_argv(args.arm, out, budget, budgets)
        # CPU seconds of this one-thread process: what the run cost, however busy the machine was around it
        start, wall = time.process_time(), time.perf_counter()
        script.main(script.parse_args(argv))
        seconds, wall = time.process_time() - start, time.perf_counter() - wall
        previous = json.loads((records / f"{args.arm}-steps-{budgets[budgets.index(budget) - 1]}.json").read_text()) \
            if budget != budgets[0] else {"training_seconds": 0.0}
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(out / args.arm / "run", partial, ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
        partial.rename(folder)
        record = {
            "arm": args.arm, "steps": budget, "threads": args.threads,
            "training_seconds": previous["training_seconds"] + seconds,
            "clock": "process CPU time",
            "wall_seconds": previous.get("wall_seconds", previous["training_seconds"]) + wall,
            "command": f"python benchmarks/bench_quality_per_compute.py train --arm {args.arm} --output-dir "
                       f"{shlex.quote(args.output_dir)} --budgets {' '.join(map(str, budgets))}",
            "script": f"train_scripts/{script_name}.py " + shlex.join(argv),
        }
        (records / f"{args.arm}-steps-{budget}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"{args.arm}: {budget} steps in {record['training_seconds']:.0f} s", flush=True)


def evaluated_rows(records: Path) -> list[dict]:
    """Every evaluation line of every arm, joined with its budget's training record (arm, steps, seconds)."""
    rows = []
    for path in sorted(records.glob("eval-*.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            folder = Path(row["model"])
            arm, steps = folder.parent.name, int(folder.name.removeprefix("steps-"))
            trained = records / f"{arm}-steps-{steps}.json"
            seconds = json.loads(trained.read_text())["training_seconds"] if trained.is_file() else None
            rows.append({**row, "arm": arm, "train_steps": steps, "training_seconds": seconds})
    return rows


def report(args) -> None:
    records = RECORDS / args.name
    rows = sorted(evaluated_rows(records), key=lambda r: (r["arm"], r["train_steps"], r["sampler"], r["nfe"]))
    print("| arm | steps | training s (1 thread) | sampler | NFE / image | FID (n=512) | probe agreement per class |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        agreement = " / ".join(f"{v:.2f}" for v in row["agreement"].values())
        seconds = "n/a" if row["training_seconds"] is None else f"{row['training_seconds']:.0f}"
        print(f"| {row['arm']} | {row['train_steps']} | {seconds} | {row['sampler']} | {row['nfe']} | "
              f"{row['fid']:.1f} | {agreement} |")
    if args.figures and rows:
        plot(rows, Path(args.figures), args.name)


def plot(rows: list[dict], folder: Path, name: str) -> None:
    """FID against training seconds (each arm's best sampler per budget) and FID against NFE (largest budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    figure, (by_time, by_nfe) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in sorted({r["arm"] for r in rows}):
        mine = [r for r in rows if r["arm"] == arm and r["training_seconds"] is not None]
        budgets = sorted({r["train_steps"] for r in mine})
        best = [min((r for r in mine if r["train_steps"] == b), key=lambda r: r["fid"]) for b in budgets]
        by_time.plot([r["training_seconds"] / 3600 for r in best], [r["fid"] for r in best], "o-", label=arm)
        last = [r for r in mine if r["train_steps"] == max(budgets, default=0)]
        for sampler in sorted({r["sampler"] for r in last}):
            points = sorted((r["nfe"], r["fid"]) for r in last if r["sampler"] == sampler)
            by_nfe.plot(*zip(*points), "o-", label=f"{arm}: {sampler}")
    by_time.set(xlabel="training hours (1 CPU thread)", ylabel="FID (512 vs 512 held-out)",
                title="quality per compute")
    by_nfe.set(xlabel="network evaluations per image (guided)", ylabel="FID", xscale="log",
               title="quality per sampling cost (largest budget)")
    by_time.legend(fontsize=7)
    by_nfe.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(folder / f"quality_per_compute_{name}.png", dpi=120)
    print(f"figure: {folder / f'quality_per_compute_{name}.png'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="split the data into training and held-out sets")
    p.add_argument("--data", required=True)
    p.add_argument("--held-out", type=int, default=512)
    p.add_argument("--output-dir", required=True)
    t = commands.add_parser("train", help="train one arm through its budgets, resumable")
    t.add_argument("--arm", choices=sorted(ARMS), required=True)
    t.add_argument("--budgets", type=int, nargs="+", default=[1000, 3000, 6000])
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--name", default="brain32", help="the records' folder name")
    t.add_argument("--output-dir", required=True)
    r = commands.add_parser("report", help="the table and plots from the records")
    r.add_argument("--name", default="brain32")
    r.add_argument("--figures", default=None, help="folder for the PNG plots")
    args = parser.parse_args(argv)
    {"prepare": prepare, "train": train, "report": report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
