"""MINIM's image-quality table: SNR, contrast, sharpness, vessel visibility and uniformity per class, for one or more
image sets (real, generated), mean +- standard deviation over images.

    python benchmarks/minim_table.py --set real=../shared/data/fundus_eye_disease \\
        [--set generated=samples.npz]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from medsyn.evaluation.image_sets import load_image_set
from medsyn.metrics.image_statistics import STATISTICS, image_statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", required=True, metavar="NAME=SPEC",
                        help="an image set as `medsyn evaluate` reads it (folder, manifest, .npz[:filters])")
    args = parser.parse_args()
    print("| set | class | images | " + " | ".join(STATISTICS) + " |")
    print("|---|---|---|" + "---|" * len(STATISTICS))
    for spec in args.set:
        name, _, path = spec.partition("=")
        image_set = load_image_set(path, name)
        start = time.perf_counter()
        values = image_statistics(image_set.images)
        seconds = time.perf_counter() - start
        groups = [("all", np.ones(len(image_set), dtype=bool))]
        if image_set.labels is not None:
            groups += [(label, image_set.labels == i) for i, label in enumerate(image_set.class_names)]
        for label, keep in groups:
            cells = [f"{values[s][keep].mean():.4g} +- {values[s][keep].std():.3g}" for s in STATISTICS]
            print(f"| {name} | {label} | {int(keep.sum())} | " + " | ".join(cells) + " |")
        print(f"({name}: {len(image_set)} images of {tuple(image_set.images.shape[1:])} in {seconds:.1f} s)")


if __name__ == "__main__":
    main()
