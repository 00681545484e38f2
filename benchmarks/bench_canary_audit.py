"""Does the DP-SGD model leak less than its accountant allows? One-run canary audits (Steinke et al. 2023) of a
plain and a DP-SGD DDPM, next to the accountant's epsilon (issue 37).

    python benchmarks/bench_canary_audit.py \\
        --data ../shared/data/brain_tumor_mri/brain_tumor_mri_4class_128.npz --resolution 32 \\
        --base-images 64 --canaries 128 --steps 1500 --epsilon 10 --output-dir /tmp/bench/canary

The training set is ``--base-images`` slices plus each of ``--canaries`` other slices by a fair coin (seeded); all
come from the training split, canaries that are structural copies of a base slice left out (the split repeats
slices). After one run per model the loss attack scores every canary; the audit guesses "in" for the top eighth
and "out" for the bottom eighth (fixed before scoring) and turns the count of right guesses into an epsilon lower
bound at 95% confidence. Resumable: a trained model is not retrained.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from bench_privacy_attacks import pipeline_at, train
from study_low_data import load_dataset

from medsyn.evaluation.low_data_study import stratified_fraction
from medsyn.output_files import write_npz_atomically, write_text_atomically
from medsyn.privacy.canary_audit import canary_audit
from medsyn.privacy.membership import AttackMethod, AttackSettings, membership_statistics
from medsyn.privacy.memorisation import nearest_training_distances
from medsyn.privacy.structure import STRUCTURE_COPY_RATIO


def prepare(args, output: Path) -> dict:
    data_file = output / "canaries.npz"
    if not data_file.exists():
        loaded = load_dataset(args.data, args.resolution)
        base = stratified_fraction(loaded["train_labels"], args.base_images / len(loaded["train"]), 0)
        unused = np.setdiff1d(np.arange(len(loaded["train"])), base)
        relative = nearest_training_distances(loaded["train"][unused], loaded["train"][base], space="structure")[0]
        canaries = np.random.default_rng(0).permutation(unused[relative > STRUCTURE_COPY_RATIO])[: args.canaries]
        included = np.random.default_rng(1).random(len(canaries)) < 0.5  # the coins
        train_rows = np.concatenate([base, canaries[included]])
        write_npz_atomically(output / "train.npz", images=loaded["train"][train_rows],
                             labels=loaded["train_labels"][train_rows], class_names=np.array(loaded["class_names"]))
        write_npz_atomically(data_file, images=loaded["train"][canaries], labels=loaded["train_labels"][canaries],
                             included=included)
    with np.load(data_file) as archive:
        return {key: archive[key] for key in archive.files}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--base-images", type=int, default=64)
    parser.add_argument("--canaries", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--epsilon", type=float, default=10.0, help="The DP model's target epsilon.")
    parser.add_argument("--generator-args", default="")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    output = Path(args.output_dir).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    canaries = prepare(args, output)
    records_file = output / "records.json"
    records = json.loads(records_file.read_text()) if records_file.exists() else {}
    guesses = len(canaries["included"]) // 8
    for name, extra in (("plain", []), (f"dp-eps-{args.epsilon:g}", ["--dp_epsilon", str(args.epsilon)])):
        folder = output / name
        if not (folder / "model_index.json").exists():
            train(output / "train.npz", folder, args.steps, args.steps, extra, args)
        if name in records:
            continue
        summary = json.loads((folder / "training_summary.json").read_text()).get("differential_privacy")
        scores = membership_statistics(pipeline_at(folder, None), torch.from_numpy(canaries["images"])[:, None],
                                       [int(x) for x in canaries["labels"]], AttackSettings(method=AttackMethod.LOSS))
        delta = summary["delta"] if summary else 1e-5
        audit = canary_audit(scores, canaries["included"], guesses, guesses, delta)
        records[name] = {**audit.to_dict(), "accountant_epsilon": summary["epsilon"] if summary else None,
                         "steps": args.steps}
        write_text_atomically(records_file, json.dumps(records, indent=2))
    lines = [f"Command: `python benchmarks/bench_canary_audit.py {' '.join(argv or sys.argv[1:])}`", "",
             "| model | accountant epsilon | canaries | guesses | right | epsilon lower bound (95%) | delta |",
             "|---|---|---|---|---|---|---|"]
    for name, r in records.items():
        accountant = "∞" if r["accountant_epsilon"] is None else f"{r['accountant_epsilon']:.2f}"
        lines.append(f"| {name} | {accountant} | {r['canaries']} | {r['guesses']} | {r['correct']} | "
                     f"{r['epsilon_lower_bound']:.2f} | {r['delta']:.1g} |")
    write_text_atomically(output / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
