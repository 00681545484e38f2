"""Speed of the memorisation audit's exact nearest-neighbour search against a naive loop and a bare matmul.

The reference case is 42,000 generated x 8,000 training images at 128x128. The search cost is linear in the
number of generated images, so by default this runs a tenth of them (4,200) and scales the time by 10; pass
``--generated 42000`` for the full run. It prints one table:

- audit: ``memorisation_audit`` with a fixed threshold (uint8 images, blocks of 1,024 queries) and its default
  exact search over every one-pixel move of every training image (9 searches), with five planted copies, three of
  them moved by a pixel, that must come back flagged;
- audit without moves (``max_shift=0``): one exact search, the unmoved copies only;
- the default audit (``space="structure"``): low-passed, normalised training images, every move and its mirror
  (18 exact searches on twice the training images, each move's training side prepared once);
- matmul: one float32 product of the same shapes (generated x pixels x training), the floor for any exact
  L2 search by this method (target: audit <= 2x matmul);
- naive loop: one generated image at a time against all training images in numpy, timed on 20 images.

    python benchmarks/bench_privacy.py
    python benchmarks/bench_privacy.py --generated 42000 --train 8000 --resolution 128
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from medsyn.privacy import memorisation_audit
from medsyn.privacy.structure import STRUCTURE_COPY_RATIO


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generated", type=int, default=4200)
    parser.add_argument("--scale-to", type=int, default=42000, help="report times scaled to this many generated")
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--naive-images", type=int, default=20)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    shape = (args.resolution, args.resolution)
    train = rng.integers(0, 256, (args.train, *shape), dtype=np.uint8)
    generated = rng.integers(0, 256, (args.generated, *shape), dtype=np.uint8)
    planted = rng.choice(args.generated, 5, replace=False)
    generated[planted] = train[rng.choice(args.train, 5, replace=False)]
    for index, (dy, dx) in zip(planted[:3], [(1, 0), (0, -1), (-1, 1)], strict=True):  # moved by a pixel, wrapped
        generated[index] = np.roll(generated[index], (dy, dx), axis=(0, 1))
    scale = args.scale_to / args.generated
    pixels = args.resolution**2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.generated} generated x {args.train} "
          f"training x {args.resolution}^2 px; times scaled x{scale:g} to {args.scale_to} generated")

    start = time.perf_counter()
    audit = memorisation_audit(generated, train, threshold=0.01, k=1, block_size=args.block_size, space="pixels")
    t_audit = time.perf_counter() - start
    assert sorted(audit.flagged_indices) == sorted(planted.tolist()), "planted copies not found"
    audit_rss = peak_rss_gib()

    start = time.perf_counter()
    plain = memorisation_audit(generated, train, threshold=0.01, k=1, block_size=args.block_size, max_shift=0,
                               space="pixels")
    t_plain = time.perf_counter() - start
    assert sorted(plain.flagged_indices) == sorted(planted[3:].tolist()), "unmoved copies not found"

    start = time.perf_counter()
    structural = memorisation_audit(generated, train, threshold=STRUCTURE_COPY_RATIO, k=1,
                                    block_size=args.block_size)
    t_structure = time.perf_counter() - start
    assert set(planted.tolist()) <= set(structural.near_copy_indices), "planted copies not found by structure"

    a = torch.from_numpy(generated.reshape(args.generated, -1)).float() / 255
    b = torch.from_numpy(train.reshape(args.train, -1)).float() / 255
    start = time.perf_counter()
    for rows in range(0, args.generated, args.block_size):
        a[rows : rows + args.block_size] @ b.T
    t_matmul = time.perf_counter() - start
    del a, b

    flat_train = train.reshape(args.train, -1).astype(np.float32) / 255
    start = time.perf_counter()
    for image in generated[: args.naive_images]:
        np.sqrt(((flat_train - image.reshape(-1).astype(np.float32) / 255) ** 2).mean(1)).argmin()
    t_naive = (time.perf_counter() - start) / args.naive_images * args.generated

    print("| method | seconds (scaled) | x matmul | notes |")
    print("|---|---|---|---|")
    print(f"| audit, every 1-px move (9 exact searches) | {t_audit * scale:.0f} | {t_audit / t_matmul:.2f} | "
          f"5/5 planted copies flagged, 3 of them moved; peak RSS {audit_rss:.1f} GiB |")
    print(f"| audit, no moves (1 exact search) | {t_plain * scale:.0f} | {t_plain / t_matmul:.2f} | "
          f"the 2 unmoved copies flagged |")
    print(f"| audit, structure (the default: 9 moves x mirror) | {t_structure * scale:.0f} | "
          f"{t_structure / t_matmul:.2f} | 5/5 planted copies found |")
    print(f"| float32 matmul, same shapes | {t_matmul * scale:.0f} | 1.00 | "
          f"{2 * args.generated * args.train * pixels / t_matmul / 1e9:.0f} GFLOP/s |")
    print(f"| naive per-image loop (numpy) | {t_naive * scale:.0f} | {t_naive / t_matmul:.1f} | "
          f"timed on {args.naive_images} images |")


if __name__ == "__main__":
    main()
