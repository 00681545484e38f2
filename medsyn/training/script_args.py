"""Command-line flags every medsyn training script shares, named as in diffusers' examples, and the data they load.

Each script adds its own model and loss flags; data, optimisation, checkpointing, logging and Hub flags mean the
same in all of them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medsyn.data import load_image_dataset, simulated_dataset
from medsyn.model_card import card_reference
from medsyn.validation import count_argument, number_argument


def add_data_arguments(parser: argparse.ArgumentParser, resolution: int = 128) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="Image folder with class sub-folders, a .csv/.jsonl manifest, or an .npz; a folder with a "
                           "metadata.jsonl/.csv (an HF imagefolder) is read as diffusers reads it.")
    data.add_argument("--dataset_name", type=str, default=None,
                      help="A Hub dataset id (needs network), a dataset saved with datasets' save_to_disk, or "
                           "'imagefolder' (with --train_data_dir).")
    data.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's config, if it has several.")
    data.add_argument("--cache_dir", type=str, default=None, help="Where downloaded datasets and models are cached.")
    data.add_argument("--image_column", type=str, default="image", help="Image column of --dataset_name.")
    data.add_argument("--label_column", type=str, default="label", help="Label column of --dataset_name.")
    data.add_argument("--simulated_num_images", type=count_argument(), default=2000,
                      help="Size of the simulated brain MRI set used when no data is given.")
    data.add_argument("--max_train_samples", type=count_argument(), default=None,
                      help="Use only the first this many images (for quick runs).")
    data.add_argument("--resolution", type=count_argument(8), default=resolution,
                      help="Image size in pixels (images are resized, then cropped to a square).")
    data.add_argument("--num_channels", type=int, default=None, choices=(1, 3),
                      help="Convert images to this many channels; default: keep the data's own.")
    data.add_argument("--center_crop", action="store_true",
                      help="Crop the centre square after resizing the short side; without it, a random square is "
                           "cropped (as diffusers; square images are not cropped either way).")
    data.add_argument("--dataloader_num_workers", type=count_argument(0), default=0,
                      help="Data-loading worker processes; 0 loads in the main process.")


def add_optimisation_arguments(parser: argparse.ArgumentParser, output_dir: str, learning_rate: float) -> None:
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default=output_dir,
                       help="Where the model, checkpoints, logs and model card go.")
    train.add_argument("--seed", type=count_argument(0), default=0,
                       help="Seed of the data order, noise and initialisation; a run is reproducible from it.")
    train.add_argument("--train_batch_size", type=count_argument(), default=16,
                       help="Images per process per optimiser step (before accumulation).")
    train.add_argument("--num_train_epochs", type=count_argument(), default=100,
                       help="Passes over the data, unless --max_train_steps is given.")
    train.add_argument("--max_train_steps", type=count_argument(), default=None, help="Overrides --num_train_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=count_argument(), default=1,
                       help="Batches accumulated per optimiser step.")
    train.add_argument("--learning_rate", type=number_argument(0, exclusive=True), default=learning_rate,
                       help="Peak learning rate (after warm-up).")
    train.add_argument("--scale_lr", action="store_true",
                       help="Multiply --learning_rate by batch size x accumulation steps x processes (as diffusers).")
    train.add_argument("--allow_tf32", action="store_true",
                       help="Allow TF32 matmuls on Ampere+ GPUs: faster, slightly less exact (as diffusers).")
    train.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute activations in the backward pass: less memory, about a third slower.")
    train.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (must be installed).")
    train.add_argument("--lr_scheduler", type=str, default="constant",
                       help="diffusers' learning-rate schedule (constant, linear, cosine, constant_with_warmup...).")
    train.add_argument("--lr_warmup_steps", type=count_argument(0), default=0,
                       help="Optimiser steps of linear warm-up (also with the constant schedule).")
    train.add_argument("--lr_schedule_steps", type=count_argument(), default=None,
                       help="The schedule's horizon in optimiser steps; default --max_train_steps. Set it to the "
                            "final length when a run is trained in stages (resumed to larger --max_train_steps), so "
                            "each stage follows the same decay.")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW's beta1.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW's beta2.")
    train.add_argument("--adam_weight_decay", type=number_argument(0), default=0.0,
                       help="AdamW's decoupled weight decay.")
    train.add_argument("--adam_epsilon", type=number_argument(0, exclusive=True), default=1e-8,
                       help="AdamW's epsilon.")
    train.add_argument("--max_grad_norm", type=number_argument(0, exclusive=True), default=1.0,
                       help="Gradients are clipped to this norm.")
    train.add_argument("--mixed_precision", type=str, default=None, choices=("no", "fp16", "bf16"),
                       help="Autocast dtype; default: accelerate's config.")
    train.add_argument("--checkpointing_steps", type=count_argument(), default=500,
                       help="Save a resumable checkpoint every this many optimiser steps.")
    train.add_argument("--checkpoints_total_limit", type=count_argument(), default=None,
                       help="Keep at most this many checkpoints (older ones go once a new one is complete).")
    train.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help='"latest" or a checkpoint folder; starts fresh if "latest" finds none.')


def add_denoising_objective_arguments(group) -> None:
    """DDPM-family training objective flags, as diffusers' scripts name them."""
    group.add_argument("--prediction_type", type=str, default="epsilon", choices=("epsilon", "v_prediction"),
                       help="What a new unet predicts; a pretrained one keeps its scheduler's.")
    group.add_argument("--snr_gamma", type=number_argument(0, exclusive=True), default=None,
                       help="Min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 is their choice); default: none.")
    group.add_argument("--noise_offset", type=number_argument(0), default=0.0,
                       help="Scale of a per-channel constant added to the noise (offset noise); 0: none.")


def add_ema_arguments(parser: argparse.ArgumentParser, decay: float) -> None:
    parser.add_argument("--use_ema", action="store_true",
                        help="Keep an exponential moving average of the weights and save it as the model.")
    parser.add_argument("--ema_decay", type=number_argument(0, exclusive=True), default=decay,
                        help="Decay of the moving average.")


def add_pretrained_arguments(group) -> None:
    """``--revision`` and ``--variant`` of ``--pretrained_model_name_or_path``, as in diffusers' scripts."""
    group.add_argument("--revision", type=str, default=None, help="Branch, tag or commit of a Hub model.")
    group.add_argument("--variant", type=str, default=None, help="Weights variant to load, e.g. fp16.")


def pretrained_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments every ``from_pretrained`` of the script's pretrained model takes."""
    return {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir}


def add_not_applicable_arguments(parser: argparse.ArgumentParser, reasons: dict[str, str]) -> None:
    """Flags of diffusers' scripts that do not apply to this method: accepted by name, refused with the reason."""
    for flag, reason in reasons.items():
        parser.add_argument(flag, type=str, default=None, help=f"Not applicable: {reason}")


def check_not_applicable(parser: argparse.ArgumentParser, args: argparse.Namespace, reasons: dict[str, str]) -> None:
    for flag, reason in reasons.items():
        if getattr(args, flag.lstrip("-")) is not None:
            parser.error(f"{flag} does not apply here: {reason}")


def add_logging_and_hub_arguments(parser: argparse.ArgumentParser) -> None:
    logs = parser.add_argument_group("validation and logging")
    logs.add_argument("--validation_steps", type=count_argument(), default=500,
                      help="Make validation images every this many optimiser steps.")
    logs.add_argument("--validation_epochs", type=count_argument(), default=None,
                      help="Also make the validation images at the end of every this many epochs.")
    logs.add_argument("--report_to", type=str, default="tensorboard", help="Tracker: tensorboard, wandb, all or none.")
    logs.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, inside --output_dir.")
    logs.add_argument("--tracker_project_name", type=str, default=None,
                      help="Project name for the trackers (default: the training method).")
    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true",
                     help="Upload the model folder and its card to the Hub at the end (checkpoints, logs stay local).")
    hub.add_argument("--hub_model_id", type=str, default=None,
                     help="The Hub repo (user/name); default: the output folder's name under your user.")
    hub.add_argument("--hub_token", type=str, default=None,
                     help="A Hub token; default: the one `hf auth login` stored.")
    hub.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")
    hub.add_argument("--license", type=str, default="other",
                     help="The weights' license in the model card (a Hub license id). The default 'other' says "
                          "they carry the training data's terms.")


def add_validation_fraction_argument(parser: argparse.ArgumentParser, default: float) -> None:
    """``--validation_fraction``: the share of images held out (``split_validation``), strictly between 0 and 1."""

    def fraction(text: str) -> float:
        value = float(text)
        if not 0 < value < 1:
            raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
        return value

    parser.add_argument("--validation_fraction", type=fraction, default=default,
                        help="Share of the images held out for validation (at least one image).")


IMAGEFOLDER = "imagefolder"
IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def check_data_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.dataset_name == IMAGEFOLDER and not args.train_data_dir:
        parser.error("--dataset_name imagefolder reads the folder given by --train_data_dir")
    if args.train_data_dir and args.dataset_name and args.dataset_name != IMAGEFOLDER:
        parser.error("give --train_data_dir or --dataset_name, not both")


def is_imagefolder_with_metadata(folder: str | None) -> bool:
    """A folder laid out as datasets' imagefolder with a metadata file (captions), at its top or in split folders."""
    if folder is None or not Path(folder).is_dir():
        return False
    places = [Path(folder), *(p for p in Path(folder).iterdir() if p.is_dir())]
    return any((place / name).is_file() for place in places for name in IMAGEFOLDER_METADATA)


def caption_column_of(dataset, requested: str) -> str:
    """The column holding captions: ``requested`` (diffusers' default is ``text``; medsyn's loader and many sets
    say ``caption``, accepted when the default is missing). A column that is not there is an error."""
    if requested in dataset.column_names:
        return requested
    if requested == "text" and "caption" in dataset.column_names:
        return "caption"
    raise ValueError(f"--caption_column {requested!r} is not a column of the data (columns: {dataset.column_names})")


def _load_datasets_library_set(args: argparse.Namespace):
    """``--dataset_name`` (a Hub id or a save_to_disk folder) or an imagefolder, as diffusers' scripts load them."""
    import datasets

    if args.dataset_name in (None, IMAGEFOLDER):
        dataset = datasets.load_dataset(IMAGEFOLDER, args.dataset_config_name, data_dir=args.train_data_dir,
                                        cache_dir=args.cache_dir, split="train")
        return dataset, f"{card_reference(args.train_data_dir)} imagefolder"
    path = Path(args.dataset_name)
    if path.exists():
        dataset = datasets.load_from_disk(str(path))
        dataset = dataset["train"] if isinstance(dataset, datasets.DatasetDict) else dataset
    else:
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir,
                                        split="train")
    return dataset, card_reference(args.dataset_name)


def load_training_data(args: argparse.Namespace, require_labels: bool = False, caption_column: str | None = None):
    """The training set with columns image, label (a ClassLabel), caption, and a description of its source.

    Args:
        args: parsed flags from ``add_data_arguments`` (and ``--seed``).
        require_labels: fail when a ``--dataset_name`` set lacks ``--label_column``; otherwise every image gets
            label 0.
        caption_column: the column holding captions (see ``caption_column_of``), renamed to ``caption``; None when
            the captions come from elsewhere.
    """
    if args.dataset_name or is_imagefolder_with_metadata(args.train_data_dir):
        import datasets

        dataset, description = _load_datasets_library_set(args)
        needed = (args.image_column, args.label_column) if require_labels else (args.image_column,)
        for column in needed:
            if column not in dataset.column_names:
                raise ValueError(f"--dataset_name {args.dataset_name}: no column {column!r} ({dataset.column_names})")
        has_labels = args.label_column in dataset.column_names
        renames = {args.image_column: "image", **({args.label_column: "label"} if has_labels else {})}
        dataset = dataset.rename_columns({old: new for old, new in renames.items() if old != new})
        if not has_labels:
            dataset = dataset.add_column("label", [0] * len(dataset))
        elif not isinstance(dataset.features["label"], datasets.ClassLabel):  # strings or ints: name the classes
            dataset = dataset.class_encode_column("label")
        if caption_column:
            column = caption_column_of(dataset, caption_column)
            if column != "caption":
                dataset = dataset.remove_columns([c for c in ["caption"] if c in dataset.column_names])
                dataset = dataset.rename_column(column, "caption")
        if args.num_channels:
            mode = "L" if args.num_channels == 1 else "RGB"
            dataset = dataset.map(lambda row: {"image": row["image"].convert(mode)})
    elif args.train_data_dir:
        from medsyn.evaluation.image_sets import parse_set_spec, selected_rows

        path, selection = parse_set_spec(args.train_data_dir)  # data.npz:split=training,part=1/2, as evaluate reads
        dataset = load_image_dataset(path, channels=args.num_channels)
        if selection:
            rows = selected_rows(args.train_data_dir, len(dataset))
            if len(rows) == 0:
                raise ValueError(f"--train_data_dir {args.train_data_dir}: the selection is empty")
            dataset = dataset.select(rows)
        description = card_reference(str(path)) + (f" ({', '.join(f'{k}={v}' for k, v in selection.items())})"
                                                   if selection else "")
        if caption_column:
            caption_column_of(dataset, caption_column)
    else:
        dataset = simulated_dataset(args.simulated_num_images, resolution=args.resolution, seed=args.seed)
        description = f"medsyn simulated brain MRI ({args.simulated_num_images} images, seed {args.seed})"
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    return dataset, description


def json_argument(value: str):
    """A JSON value given inline or as the path of a file that holds it (``--caption_templates``, ``--prompts``)."""
    path = Path(value)
    return json.loads(path.read_text() if path.is_file() else value)


def split_validation(dataset, fraction: float, seed: int):
    """(training, validation) subsets, drawn with ``seed`` so a resumed run holds out the same images."""
    order = np.random.default_rng(seed).permutation(len(dataset))
    held_out = max(1, round(fraction * len(dataset)))
    if held_out >= len(dataset):
        raise ValueError(f"{len(dataset)} images are too few to hold out {held_out} for validation")
    return dataset.select(np.sort(order[held_out:])), dataset.select(np.sort(order[:held_out]))
