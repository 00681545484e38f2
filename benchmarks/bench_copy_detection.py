"""Copy detection under nuisances on real scans: how far a planted copy of a training slice sits (relative
structural distance) after each of issue 37's nuisances, against how close unused slices of the same split come,
and how often the audit fails a set of unused slices with 1% planted copies.

The training split is shuffled (seed 0) and cut in two: ``--train`` slices play the training set, the rest are
candidates for "fresh" images. Candidates that are near-copies of a training slice by structure are left out
(the public brain set repeats slices inside its training split, PROVENANCE.md); what remains is what a generator
that learnt the distribution without copying would produce. Per run, generated and held-out sets are drawn from
those, and copies with a random nuisance are planted into the generated set.

    python benchmarks/bench_copy_detection.py --data ../shared/data/brain_tumor_mri/brain_tumor_mri_4class_128.npz \\
        --resolution 32 --runs 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medsyn.privacy import memorisation_audit
from medsyn.privacy.structure import STRUCTURE_COPY_RATIO, relative_distances, structural_nearest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_copy_detection import NUISANCES, nuisance  # the tests' nuisances, one definition


def resized(images: np.ndarray, resolution: int) -> np.ndarray:
    tensor = torch.from_numpy(images).float()[:, None]
    return F.interpolate(tensor, size=(resolution, resolution), mode="area").round().clamp(0, 255).byte()[:, 0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="an NPZ with images and a split key")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--train", type=int, default=2000, help="slices that play the training set")
    parser.add_argument("--generated", type=int, default=300)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--output", help="append the result as one JSON line")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    with np.load(args.data) as archive:
        images = archive["images"][archive["split"] == "training"] if "split" in archive else archive["images"]
    images = resized(images[np.random.default_rng(0).permutation(len(images))], args.resolution)
    train, candidates = images[: args.train], images[args.train :]
    distances, _ = structural_nearest(candidates, train, k=10)
    ratios = relative_distances(distances)
    fresh = candidates[ratios > STRUCTURE_COPY_RATIO]
    row = {"resolution": args.resolution, "train": len(train), "candidates": len(candidates),
           "candidates_that_are_copies": int((ratios <= STRUCTURE_COPY_RATIO).sum()),
           "fresh_ratio_min": float(ratios[ratios > STRUCTURE_COPY_RATIO].min()),
           "fresh_ratio_1st_percentile": float(np.percentile(ratios[ratios > STRUCTURE_COPY_RATIO], 1))}
    rng = np.random.default_rng(1)
    sources = rng.choice(len(train), size=100, replace=False)
    for kind in NUISANCES:
        copies = nuisance(train[sources], kind, rng)
        distances, indices = structural_nearest(copies, train, k=10)
        row[f"copy_ratio_max_{kind}"] = float(relative_distances(distances).max())
        row[f"copy_source_found_{kind}"] = float((indices[:, 0] == sources).mean())
    fails_with_copies, passes_fresh = [], []
    for run in range(args.runs):
        rng = np.random.default_rng(100 + run)
        order = rng.permutation(len(fresh))
        generated, held_out = fresh[order[: args.generated]], fresh[order[args.generated :][: args.held_out]]
        passes_fresh.append(memorisation_audit(generated, train, held_out=held_out, check_exchangeable=False).passed)
        planted = generated.copy()
        count = max(1, len(generated) // 100)
        for slot, source in zip(rng.choice(len(generated), count, replace=False),
                                rng.choice(len(train), count, replace=False)):
            planted[slot] = nuisance(train[source : source + 1], rng.choice(NUISANCES), rng)[0]
        fails_with_copies.append(not memorisation_audit(planted, train, held_out=held_out,
                                                        check_exchangeable=False).passed)
    row.update({"runs": args.runs, "fresh_pass_rate": float(np.mean(passes_fresh)),
                "one_percent_copies_fail_rate": float(np.mean(fails_with_copies)),
                "seconds": round(time.perf_counter() - started)})
    print("| quantity | value |\n|---|---|")
    for key, value in row.items():
        print(f"| {key} | {value:.3g} |" if isinstance(value, float) else f"| {key} | {value} |")
    if args.output:
        with open(args.output, "a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
