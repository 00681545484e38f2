"""Train the selector (reward) model of RLHF on expert ratings: an image classifier that predicts an image's
normalised rating.

    accelerate launch train_scripts/train_selector.py --ratings ratings.jsonl --images pool/samples.npz \\
        --output_dir fundus-selector

The ratings are the file ``medsyn rate`` writes; each names its image by pixel digest, found in ``--images`` (the
rated pool). Every rating of the chosen ``--aspect`` is one training sample (several raters of one image give
several). Images, not ratings, are held out, so no rated image is on both sides. The model is a new ViT of the
paper's shape, or with ``--image_encoder_name_or_path`` a trained classifier's backbone with a new one-output head.
The result is a transformers image-classification folder (``AutoModelForImageClassification`` loads it) with its
accept threshold in the config, ``selector.json`` (held-out rating accuracy, Spearman correlation, accept accuracy)
and a model card.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate.logging import get_logger
from transformers import PreTrainedModel, ViTForImageClassification

from medsyn.flag_spellings import accept_both_spellings
from medsyn.hub_upload import push_model_folder
from medsyn.model_card import write_model_card
from medsyn.rlhf.rating_images import add_rated_data_arguments, rated_samples, split_by_image
from medsyn.rlhf.ratings import Aspect
from medsyn.rlhf.selector import (
    SELECTOR_ARCHITECTURE,
    accept_threshold,
    load_selector,
    selector_config,
    selector_loss,
    selector_metrics,
    selector_scores,
)
from medsyn.training.accelerator import (
    build_accelerator,
    build_lr_scheduler,
    build_optimizer,
    end_training,
    step_budget,
)
from medsyn.training.loop import TrainingRun, run_card_fields, training_loop
from medsyn.training.script_args import add_logging_and_hub_arguments, add_optimisation_arguments
from medsyn.validation import DefaultsShown, count_argument

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsShown)
    data = add_rated_data_arguments(parser)
    data.add_argument("--aspect", type=str, default=Aspect.QUALITY.value, choices=[a.value for a in Aspect],
                      help="Which ratings to learn: image quality or the match to the prompt.")

    model = parser.add_argument_group("model (default: a new ViT of the paper's shape)")
    model.add_argument("--selector_model_name_or_path", type=str, default=None,
                       help="A selector folder to continue from (e.g. the last RLHF round's); its shape wins.")
    model.add_argument("--image_encoder_name_or_path", type=str, default=None,
                       help="A local transformers image-classification folder (e.g. train_expert.py's classifier) "
                            "whose backbone becomes the selector's, with a new one-output head; default: a new ViT.")
    for name, value in SELECTOR_ARCHITECTURE.items():
        model.add_argument(f"--{name}", type=count_argument(), default=value, help=f"ViT {name.replace('_', ' ')}.")

    add_optimisation_arguments(parser, output_dir="medsyn-selector", learning_rate=1e-4)
    parser.set_defaults(train_batch_size=32, num_train_epochs=20, dataset_name=None,
                        pretrained_model_name_or_path=None)
    add_logging_and_hub_arguments(parser)
    args = accept_both_spellings(parser).parse_args(argv)
    if args.selector_model_name_or_path and args.image_encoder_name_or_path:
        parser.error("--selector_model_name_or_path continues a selector, --image_encoder_name_or_path starts one: "
                     "pass one of them")
    return args


def main(args: argparse.Namespace, keep_process_group: bool = False) -> PreTrainedModel:
    """Train, save the selector with its threshold, metrics and card (main process), return it on every rank.
    ``keep_process_group``: run inside a caller's processes, which go on after it (``end_training``)."""
    accelerator = build_accelerator(args)
    images, ratings, digests, _ = rated_samples(args.images, args.ratings, args.aspect, args.resolution)
    train_rows, held_out_rows = split_by_image(digests, args.validation_fraction, args.seed)
    if args.selector_model_name_or_path or args.image_encoder_name_or_path:
        model = load_selector(args.selector_model_name_or_path or args.image_encoder_name_or_path, images,
                              new_head=args.image_encoder_name_or_path is not None)
    else:
        model = ViTForImageClassification(selector_config(images.shape[-1], images.shape[1],
                                                          **{k: getattr(args, k) for k in SELECTOR_ARCHITECTURE}))
    dataset = torch.utils.data.TensorDataset(images[train_rows], ratings[train_rows])

    def collate(rows):
        return {"pixel_values": torch.stack([r[0] for r in rows]), "ratings": torch.stack([r[1] for r in rows])}

    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True,
                                             drop_last=len(dataset) >= args.train_batch_size, collate_fn=collate)
    optimizer = build_optimizer(args, model.parameters())
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    updates_per_epoch, max_train_steps, _ = step_budget(args, len(dataloader))
    lr_scheduler = build_lr_scheduler(args, accelerator, optimizer, max_train_steps)

    def loss_fn(batch, step):
        return {"loss": selector_loss(model, batch["pixel_values"], batch["ratings"])}

    logger.info(f"{len(train_rows)} training and {len(held_out_rows)} held-out {args.aspect} ratings of "
                f"{len(set(digests))} images, {max_train_steps} steps")
    run = TrainingRun(accelerator, [model], list(model.parameters()), optimizer, lr_scheduler, dataloader,
                      updates_per_epoch, max_train_steps)
    result = training_loop(args, run, loss_fn, tracker_project_name="selector")

    model = accelerator.unwrap_model(model).eval()
    if accelerator.is_main_process:
        with torch.no_grad():
            threshold = accept_threshold(selector_scores(model, images[train_rows]), ratings[train_rows])
            metrics = selector_metrics(selector_scores(model, images[held_out_rows]), ratings[held_out_rows],
                                       threshold)
        logger.info(f"held out: rating accuracy {metrics['rating_accuracy']:.3f}, Spearman {metrics['spearman']:.3f}")
        save_selector(args, accelerator, model, threshold, metrics, len(train_rows), len(set(digests)), result)
    end_training(accelerator, keep_process_group)
    return model


def save_selector(args, accelerator, model, threshold: float, metrics: dict, num_train: int, num_images: int,
                  result) -> None:
    output_dir = Path(args.output_dir)
    model.config.accept_threshold = threshold
    model.config.rating_aspect = args.aspect
    model.save_pretrained(output_dir)
    (output_dir / "selector.json").write_text(json.dumps(
        {**metrics, "accept_threshold": threshold, "aspect": args.aspect}, indent=2))
    backbone = getattr(model.config, "selector_backbone", None)
    origin = f"; the backbone is {backbone}'s, trained on its own data" if backbone else "; no training scan is used"
    write_model_card(
        output_dir,
        "selector",
        **run_card_fields(args, accelerator, result),
        aspect=args.aspect,
        accept_threshold=f"{threshold:.4f}",
        rating_accuracy=f"{metrics['rating_accuracy']:.4f}",
        spearman=f"{metrics['spearman']:.4f}",
        accept_accuracy=f"{metrics['accept_accuracy']:.4f}",
        num_held_out=metrics["count"],
        num_train_ratings=num_train,
        num_images=num_images,
        ratings_file=Path(args.ratings).name,
        data_description=f"expert ratings of {num_images} generated images ({Path(args.images).name}){origin}",
        architecture=architecture(model),
    )
    if args.push_to_hub:
        push_model_folder(output_dir, args.hub_model_id or output_dir.name, args.hub_token, args.hub_private_repo)


def architecture(model: PreTrainedModel) -> str:
    """The model card's one-line description of the selector's network."""
    config = model.config
    size = f"{config.num_channels} channels, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
    if config.model_type == "vit":
        return (f"ViT, {config.patch_size} px patches, {config.hidden_size} wide, {config.num_attention_heads} heads, "
                f"{config.num_hidden_layers} layers, {config.image_size} px, {size}")
    backbone = getattr(config, "selector_backbone", None)
    origin = f", backbone from {backbone}" if backbone else ""
    return f"{type(model).__name__}{origin}, a one-output head, {size}"


if __name__ == "__main__":
    main(parse_args())
