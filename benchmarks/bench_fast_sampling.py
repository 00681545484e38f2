"""Quality per network evaluation (NFE) for the samplers of a score model, in one run.

For a trained class-conditional score model (``medsyn demo``'s recipe by default) it samples ``--per-class``
images per class with each sampler and step count, all with the same per-image seeds and guidance, and prints
NFE per image (both halves of guidance counted), images/s, the demo's label-probe class agreement and probe
Fréchet distance to held-out simulated slices (see ``medsyn.metrics.label_probe``). Annealed Langevin at its
trained schedule is run with several seeds, so its seed-to-seed spread of the distance is the yardstick: the
target is a sampler within that spread at <= 1/10 of Langevin's NFE.

    medsyn demo --output-dir medsyn-demo                      # the model (about 9 minutes on 2 cores)
    python benchmarks/bench_fast_sampling.py --model medsyn-demo/model
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from diffusers import EDMDPMSolverMultistepScheduler
from diffusers.utils import logging as diffusers_logging

from medsyn.data import SimulatedBrainMRI
from medsyn.metrics import fit_label_probe, label_probe_report
from medsyn.pipelines import ScoreLangevinPipeline
from medsyn.schedulers import AnnealedLangevinScheduler, EDMHeunScheduler
from medsyn.seeding import keyed_generator

GUIDANCE = 4.0


def samplers(langevin_config) -> list[tuple[str, object, int | None, dict]]:
    """(name, scheduler, num_inference_steps, extra call arguments) for every setting of the table."""
    settings: list[tuple[str, object, int | None, dict]] = [
        ("annealed Langevin, trained schedule", AnnealedLangevinScheduler.from_config(langevin_config), None, {}),
        ("annealed Langevin, 10 levels x 2, alpha re-derived", AnnealedLangevinScheduler.from_config(langevin_config),
         10, {"n_steps_each": 2}),
    ]
    for steps in (5, 10, 18, 25):
        settings.append(("EDM Heun, deterministic", EDMHeunScheduler.from_config(langevin_config), steps, {}))
    for steps in (5, 10, 18, 25):
        settings.append(("EDM Heun, S_churn 40", EDMHeunScheduler.from_config(langevin_config, s_churn=40.0),
                         steps, {}))
    for steps in (10, 18, 25, 50):
        settings.append(("DPM-Solver++ 2M (diffusers EDM)", EDMDPMSolverMultistepScheduler.from_config(
            langevin_config), steps, {}))
    return settings


def network_evaluations(pipe: ScoreLangevinPipeline, steps: int | None, extra: dict) -> int:
    pipe.set_schedule({"num_inference_steps": steps, **extra})
    return 2 * pipe.num_timesteps  # conditional and unconditional halves of guidance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a class-conditional ScoreLangevinPipeline folder")
    parser.add_argument("--per-class", type=int, default=64, help="images per class and setting")
    parser.add_argument("--langevin-seeds", type=int, default=3, help="seeds of the Langevin yardstick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()  # from_config names the Langevin-only settings it ignores, every time

    pipe = ScoreLangevinPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    resolution = pipe.unet.config.sample_size
    names = pipe.class_names
    train = SimulatedBrainMRI(resolution=resolution, seed=args.seed + 2).generate(4000)
    probe = fit_label_probe(train["images"], train["labels"], num_classes=len(names), epochs=20, seed=args.seed)
    held_out = SimulatedBrainMRI(resolution=resolution, seed=args.seed + 3).generate(max(256, 4 * args.per_class))
    labels = [c for c in range(len(names)) for _ in range(args.per_class)]
    langevin_config = pipe.scheduler.config

    def run(scheduler, steps, extra, seed) -> dict:
        pipe.scheduler = scheduler
        nfe = network_evaluations(pipe, steps, extra)
        started = time.perf_counter()
        images = []
        for start in range(0, len(labels), args.batch_size):
            part = labels[start : start + args.batch_size]
            images.append(pipe(class_labels=part, num_inference_steps=steps, guidance_scale=GUIDANCE,
                               generator=[keyed_generator(seed, start + i) for i in range(len(part))],
                               output_type="np", **extra).images)
        seconds = time.perf_counter() - started
        generated = np.round(np.concatenate(images)[..., 0] * 255).astype(np.uint8)
        report = label_probe_report(probe, generated, np.array(labels), held_out["images"], held_out["labels"],
                                    names)
        return {"nfe": nfe, "images_per_s": len(labels) / seconds, "distance": report.frechet_distance,
                "agreement": report.class_agreement, "floor": report.real_frechet_distance}

    print("| sampler | steps | NFE / image | images/s | probe Fréchet distance | agreement per class |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, scheduler, steps, extra in samplers(langevin_config):
        seeds = range(args.langevin_seeds) if name.endswith("trained schedule") else [0]
        results = [run(scheduler, steps, extra, args.seed + s) for s in seeds]
        rows.append((name, steps, results))
        first = results[0]
        spread = statistics.pstdev([r["distance"] for r in results]) if len(results) > 1 else float("nan")
        agreement = " / ".join(f"{v:.2f}" for v in first["agreement"].values())
        print(f"| {name} | {steps or 'trained'} | {first['nfe']} | {first['images_per_s']:.2f} | "
              f"{statistics.mean(r['distance'] for r in results):.2f}"
              + (f" ± {spread:.2f} ({len(results)} seeds)" if len(results) > 1 else "")
              + f" | {agreement} |", flush=True)
    print(f"\nprobe Fréchet distance floor (real vs real): {rows[0][2][0]['floor']:.2f}; classes {names}; "
          f"guidance {GUIDANCE}; {args.per_class} images per class")


if __name__ == "__main__":
    main()
