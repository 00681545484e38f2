"""Quality per network evaluation (NFE) for the samplers of a score model and of the DDPM baseline, in one run.

For each trained class-conditional model (a ``ScoreLangevinPipeline`` or ``ClassConditionalDDPMPipeline`` folder)
it samples ``--per-class`` images per class with each sampler at each NFE budget, all with the same per-image seeds
and guidance, and prints NFE per image (both halves of guidance counted), images/s, a label probe's class
agreement and Fréchet distance, and Inception FID against held-out real images (``--fid``). Annealed Langevin at
its trained schedule runs with several seeds: its seed-to-seed spread is the yardstick, and the target is a
sampler within it at <= 1/10 of Langevin's NFE. Annealed Langevin cut to each budget (fewer levels, 2 steps each,
the step size re-derived by NCSNv2's technique 4) is on the curve too: it is what ``num_inference_steps`` gives a
user who keeps the default sampler.

Reference images: medsyn's simulated MRI (the demo model), or a real set given as two NPZ files, the model's
training split (the probe learns from it) and a held-out split (FID and probe distances are measured against it).

    medsyn demo --output-dir medsyn-demo
    python benchmarks/bench_fast_sampling.py --model medsyn-demo/model
    python benchmarks/bench_fast_sampling.py --model score-brain --model ddpm-brain \\
        --real-train training.npz --real-test testing.npz --fid --per-class 32 --output results.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler
from diffusers.utils import logging as diffusers_logging

from medsyn.data import SimulatedBrainMRI, image_transform
from medsyn.metrics import fit_label_probe, label_probe_report
from medsyn.metrics.feature_distances import frechet_distance
from medsyn.output_files import write_npz_atomically
from medsyn.pipelines import ClassConditionalDDPMPipeline, ScoreLangevinPipeline, load_pipeline
from medsyn.schedulers import AnnealedLangevinScheduler, EDMHeunScheduler, PredictorCorrectorScheduler
from medsyn.seeding import keyed_generator

LANGEVIN = "annealed Langevin, trained schedule"
SHORT_LANGEVIN = "annealed Langevin, 2 steps per level, alpha re-derived"


@dataclass
class Setting:
    sampler: str
    scheduler: object
    steps: int | None
    extra: dict = field(default_factory=dict)


def score_settings(config, nfe_budgets: list[int], deterministic: bool) -> list[Setting]:
    """Every sampler of a score model at each NFE budget (with guidance: 2 evaluations per network call). Annealed
    Langevin needs a trained ladder of levels: an EDM-trained model (continuous levels, saved with EDM Heun) has
    none, so its rows are the ODE/SDE samplers'."""
    langevin = "num_train_timesteps" in config
    settings = []
    for nfe in nfe_budgets:
        calls = nfe // 2
        heun = max(2, round((calls + 1) / 2))  # 2N - 1 calls
        settings.append(Setting("EDM Heun, S_churn 40", EDMHeunScheduler.from_config(config, s_churn=40.0), heun))
        if deterministic:
            settings.append(Setting("EDM Heun, deterministic", EDMHeunScheduler.from_config(config), heun))
        settings.append(Setting("DPM-Solver++ 2M (diffusers EDM)", EDMDPMSolverMultistepScheduler.from_config(config),
                                max(2, calls)))
        settings.append(Setting("predictor-corrector (1 corrector step)",
                                PredictorCorrectorScheduler.from_config(config), max(2, calls // 2)))
        if langevin:
            settings.append(Setting(SHORT_LANGEVIN, AnnealedLangevinScheduler.from_config(config),
                                    max(2, (calls - 1) // 2), {"n_steps_each": 2}))  # L levels x 2 + 1 calls
    # Last, being the slowest: a run cut short has the fast samplers' rows.
    return settings + ([Setting(LANGEVIN, AnnealedLangevinScheduler.from_config(config), None)] if langevin else [])


def ddpm_settings(config, nfe_budgets: list[int]) -> list[Setting]:
    settings = []
    for nfe in nfe_budgets:
        calls = max(2, nfe // 2)
        settings.append(Setting("DDPM + DPM-Solver++ 2M", DPMSolverMultistepScheduler.from_config(config), calls))
        settings.append(Setting("DDPM + DDIM", DDIMScheduler.from_config(config), calls))
    return settings


def evaluations_per_image(pipe, setting: Setting) -> int:
    """Network evaluations per image, both halves of guidance counted."""
    if isinstance(pipe, ScoreLangevinPipeline):
        pipe.set_schedule({"num_inference_steps": setting.steps, **setting.extra})
        return 2 * pipe.num_timesteps
    return 2 * setting.steps  # one call per DDPM-family step


def real_reference(train_path: str, test_path: str, resolution: int) -> dict:
    """uint8 (N, H, W) images at the model's resolution, resized as the training scripts resize, with labels."""
    from PIL import Image

    to_tensor = image_transform(resolution)

    def load(path):
        with np.load(path, allow_pickle=False) as archive:
            images, labels, names = archive["images"], archive["labels"].astype(np.int64), list(archive["class_names"])
        resized = torch.stack([to_tensor(Image.fromarray(image)) for image in images])[:, 0]
        return np.round((resized.numpy() + 1) * 127.5).astype(np.uint8), labels, [str(n) for n in names]

    train_images, train_labels, names = load(train_path)
    test_images, test_labels, test_names = load(test_path)
    if names != test_names:
        raise ValueError(f"the two splits name different classes: {names} and {test_names}")
    # Split files are often sorted by class; the probe's real stand-in is the first images of the held-out set.
    order = np.random.default_rng(0).permutation(len(test_images))
    return {"train": (train_images, train_labels), "test": (test_images[order], test_labels[order]), "names": names}


def simulated_reference(resolution: int, seed: int, held_out: int) -> dict:
    train = SimulatedBrainMRI(resolution=resolution, seed=seed + 2).generate(4000)
    test = SimulatedBrainMRI(resolution=resolution, seed=seed + 3).generate(held_out)
    return {"train": (train["images"], train["labels"]), "test": (test["images"], test["labels"]),
            "names": ["healthy", "tumor"]}


class InceptionFID:
    """FID of uint8 grayscale images against a fixed reference set, with medsyn's FID Inception port. With
    ``cache_dir``, the real images' features (the reference, the floor's) are kept there for the next run."""

    def __init__(self, reference: np.ndarray, batch_size: int = 50, cache_dir: str | None = None):
        from medsyn.metrics.inception import FIDInceptionV3

        self.model = FIDInceptionV3.from_pretrained()
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.reference = self.real_features(reference)

    @torch.no_grad()
    def features(self, images: np.ndarray) -> torch.Tensor:
        stack = torch.from_numpy(images)[:, None]
        return torch.cat([self.model(batch) for batch in stack.split(self.batch_size)]).double()

    def real_features(self, images: np.ndarray) -> torch.Tensor:
        if self.cache_dir is None:
            return self.features(images)
        return cached_features(self.features, images, self.cache_dir)

    def __call__(self, images: np.ndarray, real: bool = False) -> float:
        """FID of ``images`` against the reference; ``real``: they are real images, whose features may be cached."""
        return frechet_distance(self.reference, self.real_features(images) if real else self.features(images))


def cached_features(compute, images: np.ndarray, cache_dir: str) -> torch.Tensor:
    """``compute(images)``, read from ``cache_dir`` when an earlier run stored it for these very pixels (the file is
    named by their digest), else computed and stored whole or not at all. On one CPU thread the held-out set's
    Inception features take about as long as a setting's sampling."""
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes() + str(images.shape).encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"inception-{digest}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return torch.from_numpy(stored["features"])
    features = compute(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_npz_atomically(path, features=features.numpy())
    return features


def run_key(model: str, sampler: str, steps: int | None, seed: int, guidance: float, per_class: int,
            with_fid: bool) -> tuple:
    """What makes two runs the same measurement: the model folder, sampler, steps, seed, guidance, sample size and
    whether FID was measured."""
    return (str(model), sampler, steps, seed, float(guidance), per_class, with_fid)


def recorded_runs(path: str) -> dict[tuple, dict]:
    """The runs an earlier invocation appended to ``path`` (none if it does not exist), by ``run_key``. A line cut
    short by a kill is skipped, so its run is repeated, and ended, so that the next append starts a line of its own."""
    runs = {}
    try:
        text = open(path).read()
    except FileNotFoundError:
        return runs
    if text and not text.endswith("\n"):
        with open(path, "a") as file:
            file.write("\n")
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        seed = row.get("base_seed", 0) + row["seed"]
        runs[run_key(row["model"], row["sampler"], row["steps"], seed, row["guidance"], row["per_class"],
                     row["fid"] is not None)] = row
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True,
                        help="a class-conditional score-Langevin or DDPM pipeline folder (repeatable)")
    parser.add_argument("--per-class", type=int, default=64, help="images per class and setting")
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 35, 50, 100],
                        help="NFE budgets per image (guidance counted)")
    parser.add_argument("--langevin-seeds", type=int, default=3, help="seeds of the Langevin yardstick")
    parser.add_argument("--deterministic-heun", action="store_true", help="also EDM Heun without churn")
    parser.add_argument("--samplers", nargs="+", metavar="NAME",
                        help="only the samplers whose name contains one of these (case-insensitive), e.g. "
                             "'Heun' 'DPM' 'Langevin': the expensive large-sample rows without the whole grid")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance weight")
    parser.add_argument("--real-train", help="NPZ of the model's training split (the probe learns from it)")
    parser.add_argument("--real-test", help="NPZ of held-out real images of the same classes")
    parser.add_argument("--fid", action="store_true", help="Inception FID against the held-out images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--output", help="append one JSON line per run to this file; runs already in it are read "
                                         "back, not repeated, so a grid stopped part-way resumes where it stopped")
    args = parser.parse_args()
    if bool(args.real_train) != bool(args.real_test):
        parser.error("--real-train and --real-test go together")
    diffusers_logging.set_verbosity_error()  # from_config names the settings a scheduler ignores, every time

    pipes = [load_pipeline(path) for path in args.model]
    resolution = pipes[0].unet.config.sample_size
    if any(p.unet.config.sample_size != resolution for p in pipes):
        raise ValueError("the models must share one resolution")
    reference = (real_reference(args.real_train, args.real_test, resolution) if args.real_train
                 else simulated_reference(resolution, args.seed, max(256, 4 * args.per_class)))
    names = reference["names"]
    probe = fit_label_probe(*reference["train"], num_classes=len(names), epochs=20, seed=args.seed)
    test_images, test_labels = reference["test"]
    cache_dir = f"{args.output}.features" if args.output else None  # resuming a grid skips the real images' pass
    fid = InceptionFID(test_images, cache_dir=cache_dir) if args.fid else None
    labels = [c for c in range(len(names)) for _ in range(args.per_class)]
    if fid is not None:  # the floor: as many real training images as each generated set, against the same reference
        rng = np.random.default_rng(args.seed)
        floor = fid(reference["train"][0][rng.choice(len(reference["train"][0]), len(labels), replace=False)],
                    real=True)
        print(f"Inception FID floor (real training vs held-out, {len(labels)} vs {len(test_images)}): {floor:.2f}")

    def run(pipe, setting: Setting, seed: int) -> dict:
        pipe.scheduler = setting.scheduler
        nfe = evaluations_per_image(pipe, setting)
        started = time.perf_counter()
        images = []
        for start in range(0, len(labels), args.batch_size):
            part = labels[start : start + args.batch_size]
            images.append(pipe(class_labels=part, num_inference_steps=setting.steps, guidance_scale=args.guidance,
                               generator=[keyed_generator(seed, start + i) for i in range(len(part))],
                               output_type="np", **setting.extra).images)
        seconds = time.perf_counter() - started
        generated = np.round(np.concatenate(images)[..., 0] * 255).astype(np.uint8)
        # the probe compares with half the held-out images at most: every other image (all classes) when FID takes
        # as many generated images as there are held-out ones
        stride = max(1, -(-2 * len(generated) // len(test_images)))
        report = label_probe_report(probe, generated[::stride], np.array(labels)[::stride], test_images,
                                    test_labels, names)
        return {"nfe": nfe, "images_per_s": len(labels) / seconds, "probe_distance": report.frechet_distance,
                "agreement": report.class_agreement, "probe_floor": report.real_frechet_distance,
                "fid": fid(generated) if fid is not None else None}

    recorded = recorded_runs(args.output) if args.output else {}
    print("| model | sampler | steps | NFE / image | images/s | probe Fréchet distance | FID | agreement per class |")
    print("|---|---|---|---|---|---|---|---|")
    for path, pipe in zip(args.model, pipes):
        pipe.set_progress_bar_config(disable=True)
        if pipe.class_names != names:
            raise ValueError(f"{path} has classes {pipe.class_names}, the reference {names}")
        kind = "score" if isinstance(pipe, ScoreLangevinPipeline) else "DDPM"
        if isinstance(pipe, ClassConditionalDDPMPipeline):
            settings = ddpm_settings(pipe.scheduler.config, args.nfe)
        else:
            settings = score_settings(pipe.scheduler.config, args.nfe, args.deterministic_heun)
        if args.samplers:
            settings = [s for s in settings if any(n.lower() in s.sampler.lower() for n in args.samplers)]
        for setting in settings:
            seeds = range(args.langevin_seeds) if setting.sampler == LANGEVIN else [0]
            results = []
            for seed in seeds:
                key = run_key(path, setting.sampler, setting.steps, args.seed + seed, args.guidance, args.per_class,
                              bool(args.fid))
                if key in recorded:
                    results.append(recorded[key])
                    continue
                results.append(run(pipe, setting, args.seed + seed))
                if args.output:  # each run as it ends: a long benchmark cut short keeps what it measured
                    with open(args.output, "a") as file:
                        file.write(json.dumps({"model": path, "kind": kind, "sampler": setting.sampler,
                                               "steps": setting.steps, "seed": seed, "base_seed": args.seed,
                                               "guidance": args.guidance, "per_class": args.per_class,
                                               **results[-1]}) + "\n")

            def summary(key):
                values = [r[key] for r in results]
                spread = f" ± {statistics.pstdev(values):.2f} ({len(values)} seeds)" if len(values) > 1 else ""
                return f"{statistics.mean(values):.2f}{spread}"

            first = results[0]
            agreement = " / ".join(f"{v:.2f}" for v in first["agreement"].values())
            print(f"| {kind} | {setting.sampler} | {setting.steps or 'trained'} | {first['nfe']} | "
                  f"{first['images_per_s']:.2f} | {summary('probe_distance')} | "
                  f"{summary('fid') if fid is not None else 'n/a'} | {agreement} |", flush=True)
    print(f"\nprobe Fréchet distance floor (real vs real): {first['probe_floor']:.2f}; classes {names}; "
          f"guidance {args.guidance}; {args.per_class} images per class")


if __name__ == "__main__":
    main()
