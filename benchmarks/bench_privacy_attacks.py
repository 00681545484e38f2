"""How much does a trained model give away to a membership attack, and how much does DP-SGD take back? (issue 18)

    python benchmarks/bench_privacy_attacks.py \\
        --data ../shared/data/brain_tumor_mri/brain_tumor_mri_4class_128.npz --resolution 32 \\
        --train-images 500 --steps 1000 3000 --epsilons 10 5 1 --output-dir /tmp/bench/privacy

A small training set, the regime where memorisation happens. For a plain DDPM at each of ``--steps`` (one run,
measured at its checkpoints) and a DP-SGD DDPM per ``--epsilons`` (``--dp-steps`` steps): the loss
attack's AUC and TPR at 1% FPR (training images against held-out ones), the black-box attacks on its released
samples (``medsyn.privacy.released_set``, with a null: training-split images the model never saw in the members'
place), the Inception FID of its samples to held-out images, the audit's verdict on them, and the seconds per
training step. Held-out images are unused slices of the training split that are no structural copy of a member
(the test split is not exchangeable with the training split). Resumable: a finished model or measurement is not
redone.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from study_low_data import inception_fid, load_dataset

from medsyn.evaluation.low_data_study import stratified_fraction
from medsyn.output_files import write_npz_atomically, write_text_atomically
from medsyn.privacy.membership import AttackMethod, AttackSettings, attack_report, membership_statistics
from medsyn.privacy.memorisation import nearest_training_distances
from medsyn.privacy.structure import STRUCTURE_COPY_RATIO

RECIPE = [  # a small CPU-sized DDPM, no augmentation and no EMA: the plain regime an attack targets
    "--base_channels", "16", "--channel_mult", "1", "2", "2", "--layers_per_block", "1", "--norm_num_groups", "8",
    "--class_conditional", "--train_batch_size", "32", "--learning_rate", "1e-3", "--lr_warmup_steps", "50",
    "--report_to", "none", "--num_validation_images", "1", "--validation_inference_steps", "5",
]


def train(train_file: Path, output: Path, steps: int, checkpoint_every: int, extra: list[str], args) -> float:
    """Train (resuming when a checkpoint is there); seconds per step of this call's steps."""
    from medsyn.train_scripts.train_ddpm import main, parse_args

    started = time.perf_counter()
    main(parse_args(RECIPE + shlex.split(args.generator_args) + extra + [
        "--train_data_dir", str(train_file), "--resolution", str(args.resolution), "--seed", "0",
        "--max_train_steps", str(steps), "--checkpointing_steps", str(checkpoint_every),
        "--validation_steps", str(steps + 1), "--output_dir", str(output), "--resume_from_checkpoint", "latest",
    ]))
    return (time.perf_counter() - started) / steps


def pipeline_at(model: Path, checkpoint: Path | None):
    """The trained pipeline, with the weights of ``checkpoint`` (a plain run's) when given."""
    from medsyn.pipelines import load_pipeline

    pipe = load_pipeline(model)
    if checkpoint is not None:
        pipe.unet.load_state_dict(load_file(checkpoint / "model.safetensors"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(pipe, data: dict, args, inception, cache: dict) -> dict:
    from medsyn.generation import ImageKey, SamplingSettings, sample_image_set
    from medsyn.privacy import memorisation_audit

    settings = AttackSettings(method=AttackMethod.LOSS)
    members = membership_statistics(pipe, torch.from_numpy(data["members"])[:, None],
                                    [int(x) for x in data["member_labels"]], settings)
    held_out = membership_statistics(pipe, torch.from_numpy(data["non_members"])[:, None],
                                     [int(x) for x in data["non_member_labels"]], settings)
    report = attack_report(members, held_out, settings, resamples=args.resamples)
    keys = [ImageKey(0, i, class_label=int(data["member_labels"][i % len(data["members"])]))
            for i in range(args.num_samples)]
    samples = sample_image_set(pipe, keys, SamplingSettings(), batch_size=64)
    audit = memorisation_audit(samples, data["members"], held_out=data["non_members"])
    result = {"auc": report.auc, "auc_ci": report.auc_ci, "leakage_auc": report.leakage_auc,
              "tpr_at_1pct_fpr": report.tpr_at_1pct_fpr, "tpr_at_1pct_fpr_ci": report.tpr_at_1pct_fpr_ci,
              "audit": {"verdict": audit.verdict, "passed": audit.passed,
                        "near_copies": len(audit.near_copy_indices)},
              "released_set": released_set_attacks(samples, data, args)}
    if inception is not None:
        result["fid_to_held_out"] = inception_fid(inception, samples, data["non_members"], cache)
    return result


def released_set_attacks(samples: np.ndarray, data: dict, args) -> dict:
    """The black-box attacks on the released samples: members against half the held-out images (the other half is
    DOMIAS's reference); and, as the null, training-split images the model never saw (``outsiders``) in the
    members' place, so the attack faces a model trained on other data."""
    from medsyn.privacy.released_set import ReleasedSetSettings, released_set_statistics

    half = len(data["non_members"]) // 2
    # The split repeats slices; released_set_statistics leaves the reference's copies of each run's candidates out.
    non_members, reference = data["non_members"][:half], data["non_members"][half:]
    results = {}
    for method in ("nearest", "domias"):
        settings = ReleasedSetSettings(method=method)
        for role, candidates in (("members", data["members"]), ("outsiders", data.get("outsiders"))):
            if candidates is None:
                continue
            statistics = released_set_statistics(samples, candidates, non_members, reference, settings)
            report = attack_report(*statistics, settings, resamples=args.resamples)
            results[f"{method}-{role}"] = {"auc": report.auc, "auc_ci": report.auc_ci,
                                           "tpr_at_1pct_fpr": report.tpr_at_1pct_fpr,
                                           "tpr_at_1pct_fpr_ci": report.tpr_at_1pct_fpr_ci}
    return results


def split_pool(args, loaded: dict) -> tuple[np.ndarray, np.ndarray]:
    """The members' indices into the training split, and the shuffled pool of the others that are no structural copy
    of a member: non-members, DOMIAS's reference, the outsiders, then the reference models' population, in order.
    Non-members come from the training split's unused slices: the test split is not exchangeable with it
    (PROVENANCE.md), so an attack would measure the shift; the split repeats slices, hence the copies left out."""
    chosen = stratified_fraction(loaded["train_labels"], args.train_images / len(loaded["train"]), 0)
    unused = np.setdiff1d(np.arange(len(loaded["train"])), chosen)
    relative = nearest_training_distances(loaded["train"][unused], loaded["train"][chosen], space="structure")[0]
    return chosen, np.random.default_rng(0).permutation(unused[relative > STRUCTURE_COPY_RATIO])


def reference_models(args, output: Path, data: dict) -> list[Path]:
    """``--reference-models`` plain models trained as the target was, each on as many images drawn from the pool's
    remainder (no member, non-member or outsider, nor a structural copy of a member or non-member)."""
    population_file = output / "population.npz"
    if not population_file.exists():
        loaded = load_dataset(args.data, args.resolution)
        _, pool = split_pool(args, loaded)
        rest = pool[args.non_members + len(data["members"]) :]
        candidates = np.concatenate([data["members"], data["non_members"]])
        relative = nearest_training_distances(loaded["train"][rest], candidates, space="structure")[0]
        rest = rest[relative > STRUCTURE_COPY_RATIO]
        write_npz_atomically(population_file, images=loaded["train"][rest], labels=loaded["train_labels"][rest],
                             class_names=np.array(loaded["class_names"]))
    with np.load(population_file) as archive:
        population = {key: archive[key] for key in archive.files}
    folders = []
    for number in range(args.reference_models):
        folder, train_file = output / f"reference-{number}", output / f"reference-{number}.npz"
        if not (folder / "model_index.json").exists():
            rows = np.random.default_rng(100 + number).permutation(len(population["images"]))[: len(data["members"])]
            write_npz_atomically(train_file, images=population["images"][rows], labels=population["labels"][rows],
                                 class_names=population["class_names"])
            train(train_file, folder, max(args.steps), max(args.steps), [], args)
        folders.append(folder)
    return folders


def lira(target, folders: list[Path], data: dict, args) -> dict:
    """Offline LiRA on the target: its loss statistic read against the reference models'."""
    from medsyn.privacy.reference_attack import lira_offline_statistics

    settings = AttackSettings(method=AttackMethod.LIRA)
    images = torch.from_numpy(np.concatenate([data["members"], data["non_members"]]))[:, None]
    labels = [int(x) for x in np.concatenate([data["member_labels"], data["non_member_labels"]])]
    references = np.stack([membership_statistics(pipeline_at(folder, None), images, labels, settings)
                           for folder in folders])
    scores = lira_offline_statistics(membership_statistics(target, images, labels, settings), references)
    report = attack_report(scores[: len(data["members"])], scores[len(data["members"]) :], settings,
                           resamples=args.resamples)
    return {"auc": report.auc, "auc_ci": report.auc_ci, "tpr_at_1pct_fpr": report.tpr_at_1pct_fpr,
            "tpr_at_1pct_fpr_ci": report.tpr_at_1pct_fpr_ci, "reference_models": len(folders)}


def write_report(records: dict, args, output: Path) -> None:
    lines = [f"Command: `python benchmarks/bench_privacy_attacks.py {' '.join(args.argv)}`", "",
             f"{args.train_images} training images at {args.resolution} px; members = all of them, non-members = "
             f"{records['non_members']} unused training-split images (structural copies of a member removed).", "",
             "| model | epsilon | steps | s/step | loss-attack AUC [95% CI] | TPR @ 1% FPR [95% CI] | FID to held-out "
             "| audit |", "|---|---|---|---|---|---|---|---|"]
    done = [(name, r) for name, r in records["models"].items() if "auc" in r]
    for name, r in sorted(done, key=lambda item: (item[1]["epsilon"] != "inf", -float(item[1]["epsilon"]),
                                                  item[1]["steps"])):
        fid = f"{r['fid_to_held_out']:.1f}" if "fid_to_held_out" in r else "n/a"
        lines.append(f"| {name} | {r['epsilon']} | {r['steps']} | {r['seconds_per_step']:.2f} | {r['auc']:.3f} "
                     f"[{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}] | {r['tpr_at_1pct_fpr']:.3f} "
                     f"[{r['tpr_at_1pct_fpr_ci'][0]:.3f}, {r['tpr_at_1pct_fpr_ci'][1]:.3f}] | {fid} | "
                     f"{'passed' if r['audit']['passed'] else 'FAILED'}, {r['audit']['near_copies']} near-copies |")
    lines += ["", f"Released samples ({args.num_samples}), black box: members (or outsiders, training-split images "
              "the model never saw) against half the held-out images; DOMIAS's reference is the other half, less its "
              "structural copies of the run's candidates.", "",
              "| model | steps | attack | candidates | AUC [95% CI] | TPR @ 1% FPR [95% CI] |",
              "|---|---|---|---|---|---|"]
    for name, r in sorted(done, key=lambda item: (item[1]["epsilon"] != "inf", -float(item[1]["epsilon"]),
                                                  item[1]["steps"])):
        for key, attack in r.get("released_set", {}).items():
            method, role = key.split("-")
            lines.append(f"| {name} | {r['steps']} | {method} | {role} | {attack['auc']:.3f} "
                         f"[{attack['auc_ci'][0]:.3f}, {attack['auc_ci'][1]:.3f}] | {attack['tpr_at_1pct_fpr']:.3f} "
                         f"[{attack['tpr_at_1pct_fpr_ci'][0]:.3f}, {attack['tpr_at_1pct_fpr_ci'][1]:.3f}] |")
    with_lira = [(name, r) for name, r in done if "lira" in r]
    if with_lira:
        lines += ["", "Offline LiRA: the loss statistic against reference models trained as the target was on other "
                  "images of the pool (pooled spread).", "",
                  "| model | steps | reference models | AUC [95% CI] | TPR @ 1% FPR [95% CI] |",
                  "|---|---|---|---|---|"]
        for name, r in with_lira:
            attack = r["lira"]
            lines.append(f"| {name} | {r['steps']} | {attack['reference_models']} | {attack['auc']:.3f} "
                         f"[{attack['auc_ci'][0]:.3f}, {attack['auc_ci'][1]:.3f}] | {attack['tpr_at_1pct_fpr']:.3f} "
                         f"[{attack['tpr_at_1pct_fpr_ci'][0]:.3f}, {attack['tpr_at_1pct_fpr_ci'][1]:.3f}] |")
    write_text_atomically(output / "report.md", "\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="A medsyn NPZ with a split array, or a labelled folder.")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=500)
    parser.add_argument("--non-members", type=int, default=500, help="Held-out images attacked as non-members.")
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 3000],
                        help="Plain-model steps to measure (multiples of the smallest).")
    parser.add_argument("--epsilons", type=float, nargs="*", default=[10.0, 5.0, 1.0])
    parser.add_argument("--dp-steps", type=int, default=None, help="Steps of the DP models; default: the largest "
                        "of --steps (a DP step costs about 2x a plain one on a CPU).")
    parser.add_argument("--generator-args", default="", help="More train_ddpm flags, e.g. '--dp_noise_multiplicity 4'.")
    parser.add_argument("--num-samples", type=int, default=250, help="Generated images for the audit and FID.")
    parser.add_argument("--reference-models", type=int, default=0,
                        help="Plain models for offline LiRA on the plain model's last step (0: no LiRA).")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--no-fid", action="store_true")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    if any(s % min(args.steps) for s in args.steps):
        parser.error("--steps must be multiples of the smallest")
    args.argv = argv if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    data_file = output / "data.npz"
    if not data_file.exists():
        loaded = load_dataset(args.data, args.resolution)
        chosen, pool = split_pool(args, loaded)
        members, labels = loaded["train"][chosen], loaded["train_labels"][chosen]
        picked, outsiders = pool[: args.non_members], pool[args.non_members : args.non_members + len(members)]
        write_npz_atomically(data_file, members=members, member_labels=labels, non_members=loaded["train"][picked],
                             outsiders=loaded["train"][outsiders],
                             non_member_labels=loaded["train_labels"][picked],
                             class_names=np.array(loaded["class_names"]))
        write_npz_atomically(output / "train.npz", images=members, labels=labels,
                             class_names=np.array(loaded["class_names"]))
    with np.load(data_file) as archive:
        data = {key: archive[key] for key in archive.files}
    records_file = output / "records.json"
    records = json.loads(records_file.read_text()) if records_file.exists() else {"models": {}}
    records["non_members"] = int(len(data["non_members"]))
    inception = None
    if not args.no_fid:
        from medsyn.metrics.inception import FIDInceptionV3

        inception = FIDInceptionV3.from_pretrained()
    cache: dict = {}
    longest, dp_steps = max(args.steps), args.dp_steps or max(args.steps)
    runs = [("plain", None, output / "plain", [])] + [
        (f"dp-eps-{eps:g}", eps, output / f"dp-eps-{eps:g}", ["--dp_epsilon", str(eps)]) for eps in args.epsilons]
    for name, epsilon, folder, extra in runs:
        final = longest if epsilon is None else dp_steps
        if not (folder / "model_index.json").exists():
            seconds = train(output / "train.npz", folder, final, min(args.steps) if epsilon is None else final,
                            extra, args)
            records["models"].setdefault(name, {})["seconds_per_step"] = seconds
        measured = args.steps if epsilon is None else [final]
        for steps in measured:
            key = name if steps == final else f"{name}-{steps}"
            entry = records["models"].setdefault(key, {})
            entry.update(epsilon="inf" if epsilon is None else epsilon, steps=steps,
                         seconds_per_step=records["models"].get(name, {}).get("seconds_per_step", float("nan")))
            if "auc" not in entry or "released_set" not in entry:
                checkpoint = folder / f"checkpoint-{steps}" if steps != final else None
                entry.update(measure(pipeline_at(folder, checkpoint), data, args, inception, cache))
            if epsilon is not None:
                summary = json.loads((folder / "training_summary.json").read_text())["differential_privacy"]
                entry["epsilon"] = round(summary["epsilon"], 3)
            write_text_atomically(records_file, json.dumps(records, indent=2))
            write_report(records, args, output)
    plain = records["models"].get("plain")
    if args.reference_models and plain and plain.get("lira", {}).get("reference_models") != args.reference_models:
        folders = reference_models(args, output, data)
        plain["lira"] = lira(pipeline_at(output / "plain", None), folders, data, args)
        write_text_atomically(records_file, json.dumps(records, indent=2))
        write_report(records, args, output)
    print((output / "report.md").read_text())


if __name__ == "__main__":
    main()
