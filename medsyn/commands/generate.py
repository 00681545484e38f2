"""`medsyn generate`: images from a saved score, DDPM or MediSyn pipeline, as PNGs or one NPZ; image i depends only
on (seed, i), and an interrupted run resumes."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from medsyn.commands.common import would_overwrite
from medsyn.schedulers.samplers import Sampler, sampler_scheduler
from medsyn.validation import class_label_value, count_argument, number_argument


def add_parser(commands, shown: dict) -> None:
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
    gen.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
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
    if would_overwrite(targets, args.overwrite):
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
