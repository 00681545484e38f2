"""Train the expert classifier of feature-aligned diffusion: a ResNet (ResNet50 by default) on labelled scans.

    accelerate launch train_scripts/train_expert.py \\
        --train_data_dir ../shared/data/brain_tumor_mri/brain_tumor_mri_4class_128.npz \\
        --pretrained_model_name_or_path microsoft/resnet-50 --output_dir brain-mri-expert

With ImageNet weights (``--pretrained_model_name_or_path``, a Hub id or local folder) it fine-tunes them; without,
it trains the ResNet50 architecture from scratch, offline. The paper's recipe is the default (lr 1e-4, batch 64,
224 px, 15 epochs, weight decay); shrink ``--resolution``, ``--depths`` and ``--hidden_sizes`` for a CPU. The result
is a transformers ``ResNetForImageClassification`` folder (safetensors) with its image processor, which
``--align_expert`` of the diffusion training scripts loads; validation accuracy and the confusion matrix go into
its model card and ``validation.json``.

``--noise_augment ve`` (score models) or ``ddpm`` (MediSyn) trains it on the diffusion model's noisy inputs, at
one random noise level per image, as classifiers for classifier guidance are trained; its accuracy per noise level
is then measured, saved in its config and card, and used by alignment to skip the levels where it guesses. Train a
noise-aware expert at the diffusion model's resolution, so that the noise it learns is the noise it will see.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from torchmetrics.functional.classification import multiclass_confusion_matrix
from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

from medsyn.data import image_channels, image_transform, random_affine
from medsyn.flag_spellings import accept_both_spellings
from medsyn.hub_upload import push_model_folder
from medsyn.metrics.features import PooledImageEncoder
from medsyn.model_card import card_reference, write_model_card
from medsyn.schedulers.ncsn_rules import sigma_max_from_data
from medsyn.training.accelerator import (
    build_accelerator,
    build_lr_scheduler,
    build_optimizer,
    enable_gradient_checkpointing,
    step_budget,
)
from medsyn.training.expert_noise import MEDISYN_BETAS, ExpertNoise, NoiseAccuracy, NoiseProcess
from medsyn.training.feature_alignment import EXPERT_NOISE_KEY
from medsyn.training.loop import TrainingResult, TrainingRun, run_card_fields, training_loop
from medsyn.training.script_args import (
    add_data_arguments,
    add_logging_and_hub_arguments,
    add_optimisation_arguments,
    add_pretrained_arguments,
    add_validation_fraction_argument,
    check_data_arguments,
    load_training_data,
    pretrained_kwargs,
    split_validation,
)
from medsyn.validation import DefaultsShown, count_argument, number_argument

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsShown)
    add_data_arguments(parser, resolution=224)
    add_validation_fraction_argument(parser, default=0.1)
    parser.add_argument("--augment", action="store_true", help="Small random affine (no flips).")

    model = parser.add_argument_group("model (default: ResNet50's architecture)")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="A transformers ResNet (e.g. microsoft/resnet-50) to fine-tune; default: from scratch.")
    add_pretrained_arguments(model)
    model.add_argument("--embedding_size", type=count_argument(), default=64, help="Channels of the ResNet stem.")
    model.add_argument("--hidden_sizes", type=count_argument(), nargs="+", default=[256, 512, 1024, 2048],
                       help="Channels per ResNet stage.")
    model.add_argument("--depths", type=count_argument(), nargs="+", default=[3, 4, 6, 3],
                       help="Blocks per ResNet stage.")
    model.add_argument("--layer_type", type=str, default="bottleneck", choices=("basic", "bottleneck"),
                       help="ResNet block type.")

    noise = parser.add_argument_group("noise augmentation (a noise-aware expert for feature alignment)")
    noise.add_argument("--noise_augment", type=str, default=None, choices=[p.value for p in NoiseProcess],
                       help="Train on the diffusion model's noise: ve (score models) or ddpm (MediSyn's pixel view).")
    noise.add_argument("--sigma_max", type=number_argument(0, exclusive=True), default=None,
                       help="ve: largest noise level; default: the largest pairwise data distance, as "
                            "train_score_langevin.py derives it.")
    noise.add_argument("--sigma_min", type=number_argument(0, exclusive=True), default=0.01,
                       help="ve: smallest noise level.")
    noise.add_argument("--num_train_timesteps", type=count_argument(2), default=MEDISYN_BETAS["num_train_timesteps"],
                       help="ddpm: timesteps of the schedule.")
    noise.add_argument("--beta_schedule", type=str, default=MEDISYN_BETAS["beta_schedule"],
                       help="ddpm: the diffusers beta schedule.")
    noise.add_argument("--beta_start", type=number_argument(0, exclusive=True), default=MEDISYN_BETAS["beta_start"],
                       help="ddpm: the first beta.")
    noise.add_argument("--beta_end", type=number_argument(0, exclusive=True), default=MEDISYN_BETAS["beta_end"],
                       help="ddpm: the last beta.")
    noise.add_argument("--noise_eval_levels", type=count_argument(2), default=10,
                       help="Noise levels at which the held-out accuracy is measured.")

    add_optimisation_arguments(parser, output_dir="medsyn-expert", learning_rate=1e-4)
    parser.set_defaults(train_batch_size=64, num_train_epochs=15, adam_weight_decay=1e-2)
    add_logging_and_hub_arguments(parser)

    args = accept_both_spellings(parser).parse_args(argv)
    check_data_arguments(parser, args)
    if len(args.hidden_sizes) != len(args.depths):
        parser.error(f"--hidden_sizes has {len(args.hidden_sizes)} entries for {len(args.depths)} --depths")
    return args


def build_classifier(args, channels: int, class_names: list[str]) -> tuple[ResNetForImageClassification, list, list]:
    """(classifier, image mean, image std). Pretrained weights keep their channels and normalisation (grayscale is
    repeated to their 3 channels); a new model takes the data's channels, normalised to [-1, 1]."""
    labels = dict(num_labels=len(class_names), id2label=dict(enumerate(class_names)),
                  label2id={name: i for i, name in enumerate(class_names)})
    if args.pretrained_model_name_or_path:
        from transformers import AutoImageProcessor

        model = ResNetForImageClassification.from_pretrained(
            args.pretrained_model_name_or_path, ignore_mismatched_sizes=True, **labels, **pretrained_kwargs(args)
        )
        processor = AutoImageProcessor.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                                       cache_dir=args.cache_dir)
        mean, std = list(processor.image_mean), list(processor.image_std)
        if channels not in (1, model.config.num_channels):
            raise ValueError(f"the data has {channels} channels; the pretrained model takes {model.config.num_channels}")
        if channels != model.config.num_channels:
            logger.info(f"grayscale images are repeated to the pretrained model's {model.config.num_channels} channels")
        return model, mean, std
    config = ResNetConfig(num_channels=channels, embedding_size=args.embedding_size, hidden_sizes=args.hidden_sizes,
                          depths=args.depths, layer_type=args.layer_type, **labels)
    return ResNetForImageClassification(config), [0.5] * channels, [0.5] * channels


def labelled_loaders(args, train_set, validation_set):
    """(shuffled training loader, validation loader in order) of images in [-1, 1] at --resolution and labels."""
    to_tensor = image_transform(args.resolution, center_crop=args.center_crop)

    def collate(rows):
        return {"pixel_values": torch.stack([to_tensor(row["image"]) for row in rows]),
                "labels": torch.tensor([row["label"] for row in rows], dtype=torch.long)}

    loader_kwargs = dict(batch_size=args.train_batch_size, collate_fn=collate, num_workers=args.dataloader_num_workers)
    train_loader = torch.utils.data.DataLoader(
        train_set, shuffle=True, drop_last=len(train_set) >= args.train_batch_size, **loader_kwargs
    )
    return train_loader, torch.utils.data.DataLoader(validation_set, shuffle=False, **loader_kwargs)


def build_noise(args, train_set) -> ExpertNoise | None:
    """The --noise_augment process; the ve sigma_max as the score script derives it from the data."""
    if args.noise_augment is None:
        return None
    if args.noise_augment == NoiseProcess.DDPM:
        return ExpertNoise(NoiseProcess.DDPM, num_train_timesteps=args.num_train_timesteps,
                           beta_schedule=args.beta_schedule, beta_start=args.beta_start, beta_end=args.beta_end)
    sigma_max = args.sigma_max
    if sigma_max is None:
        to_tensor = image_transform(args.resolution, center_crop=args.center_crop)
        sample = torch.stack([to_tensor(train_set[i]["image"]) for i in range(min(len(train_set), 2000))])
        sigma_max = sigma_max_from_data(sample)
    return ExpertNoise(NoiseProcess.VE, sigma_min=args.sigma_min, sigma_max=sigma_max)


def noisy_view(noise: ExpertNoise, images: torch.Tensor, sigma: torch.Tensor, generator) -> torch.Tensor:
    """Images in [-1, 1] corrupted at levels ``sigma`` and scaled as ``FrozenExpert`` scales them."""
    corrupted = noise.corrupt(images, sigma, torch.randn(images.shape, generator=generator, device=images.device))
    return noise.expert_view(corrupted, sigma)


@torch.no_grad()
def evaluate(classifier, encoder: PooledImageEncoder, loader, device, num_classes: int,
             noise: ExpertNoise | None = None, sigma: float | None = None, seed: int = 0) -> dict:
    """Accuracy and the confusion matrix (rows: true class, columns: predicted) on ``loader``, of clean images or of
    images at noise level ``sigma`` (seeded noise)."""
    classifier.eval()
    generator = torch.Generator(device).manual_seed(seed)
    predicted, truth = [], []
    for batch in loader:
        images = batch["pixel_values"].to(device)
        if sigma is not None:
            images = noisy_view(noise, images, torch.full((len(images),), sigma, device=device), generator)
        predicted.append(classifier(pixel_values=encoder.normalise(images / 2 + 0.5)).logits.argmax(1).cpu())
        truth.append(batch["labels"])
    predicted, truth = torch.cat(predicted), torch.cat(truth)
    matrix = multiclass_confusion_matrix(predicted, truth, num_classes=num_classes)
    return {"accuracy": (predicted == truth).float().mean().item(), "confusion_matrix": matrix.tolist()}


def main(args: argparse.Namespace) -> ResNetForImageClassification:
    """Train, save the classifier with its processor and card (main process), return it on every rank."""
    accelerator = build_accelerator(args)
    dataset, data_description = load_training_data(args, require_labels=True)
    class_names = list(dataset.features["label"].names)
    if len(class_names) < 2:
        raise ValueError(f"an expert classifier needs at least two classes, the data has {class_names}")
    train_set, validation_set = split_validation(dataset, args.validation_fraction, args.seed)
    channels = image_channels(dataset)
    classifier, mean, std = build_classifier(args, channels, class_names)
    enable_gradient_checkpointing(args, classifier)
    encoder = PooledImageEncoder(classifier.resnet, mean, std)  # the normalisation FrozenExpert will apply

    train_loader, validation_loader = labelled_loaders(args, train_set, validation_set)
    optimizer = build_optimizer(args, classifier.parameters())
    classifier, optimizer, train_loader = accelerator.prepare(classifier, optimizer, train_loader)
    encoder.to(accelerator.device)
    updates_per_epoch, max_train_steps, _ = step_budget(args, len(train_loader))
    lr_scheduler = build_lr_scheduler(args, accelerator, optimizer, max_train_steps)

    noise = build_noise(args, train_set)

    def loss_fn(batch, step):
        images = batch["pixel_values"]
        if args.augment:
            images = random_affine(images, generator=step.generator)
        if noise is not None:
            sigma = noise.sample_sigmas(len(images), step.generator, images.device)
            images = noisy_view(noise, images, sigma, step.generator)
        logits = classifier(pixel_values=encoder.normalise(images / 2 + 0.5)).logits
        return {"loss": F.cross_entropy(logits.float(), batch["labels"])}

    def validate(step):
        metrics = evaluate(classifier, encoder, validation_loader, accelerator.device, len(class_names))
        accelerator.log({"validation/accuracy": metrics["accuracy"]}, step=step)

    logger.info(f"{len(train_set)} training and {len(validation_set)} validation images, classes {class_names}, "
                f"{max_train_steps} steps")
    run = TrainingRun(accelerator, [classifier], list(classifier.parameters()), optimizer, lr_scheduler, train_loader,
                      updates_per_epoch, max_train_steps)
    result = training_loop(args, run, loss_fn, tracker_project_name="expert", validate=validate)

    model = accelerator.unwrap_model(classifier).eval()
    if accelerator.is_main_process:
        metrics = evaluate(model, encoder, validation_loader, accelerator.device, len(class_names))
        logger.info(f"validation accuracy {metrics['accuracy']:.4f}")
        accuracy = noise_accuracy(model, encoder, validation_loader, accelerator.device, len(class_names), noise,
                                  args) if noise else None
        save_expert(args, accelerator, model, mean, std, metrics, class_names, data_description, len(train_set),
                    len(validation_set), channels, result, noise, accuracy)
    accelerator.end_training()
    return model


def noise_accuracy(model, encoder, loader, device, num_classes: int, noise: ExpertNoise, args) -> NoiseAccuracy:
    """Held-out accuracy at evenly spread noise levels; chance is the held-out set's majority-class fraction (the
    confusion matrix's largest row)."""
    sigmas = noise.evaluation_sigmas(args.noise_eval_levels)
    results = [evaluate(model, encoder, loader, device, num_classes, noise, sigma, args.seed) for sigma in sigmas]
    class_counts = torch.tensor(results[0]["confusion_matrix"]).sum(1)
    chance = class_counts.max().item() / class_counts.sum().item()
    accuracies = [result["accuracy"] for result in results]
    for sigma, accuracy in zip(sigmas, accuracies):
        logger.info(f"validation accuracy at sigma {sigma:.4g}: {accuracy:.4f} (chance {chance:.3f})")
    return NoiseAccuracy(sigmas, accuracies, chance)


def noise_table(noise: ExpertNoise | None, accuracy: NoiseAccuracy | None) -> str:
    """The model card's accuracy per noise level."""
    if noise is None:
        return ("Trained on clean images only: as an alignment expert it sees noisy inputs it never saw "
                "(retrain with `--noise_augment`).")
    ddpm = noise.process is NoiseProcess.DDPM
    rows = [f"| {sigma:.4g} | " + (f"{1 / (1 + sigma**2):.4f} | " if ddpm else "") + f"{value:.4f} |"
            for sigma, value in zip(accuracy.sigmas, accuracy.accuracies)]
    header = "| sigma (VE-equivalent) | " + ("alpha-bar | " if ddpm else "") + "accuracy |"
    return "\n".join([f"Trained on {noise.process.value} noise ({noise.to_dict()}); chance (majority class) "
                      f"{accuracy.chance:.4f}.", "", header, "|---" * (3 if ddpm else 2) + "|", *rows])


def save_expert(args, accelerator, model, mean, std, metrics, class_names, data_description, num_train,
                num_validation, channels, result: TrainingResult, noise: ExpertNoise | None,
                accuracy: NoiseAccuracy | None) -> None:
    output_dir = Path(args.output_dir)
    model.config.image_size = args.resolution  # the side FrozenExpert resizes noisy inputs to
    if noise is not None:
        setattr(model.config, EXPERT_NOISE_KEY, {"process": noise.to_dict(), "accuracy": accuracy.to_dict()})
    model.save_pretrained(output_dir)
    ConvNextImageProcessor(size={"shortest_edge": args.resolution}, crop_pct=1.0, image_mean=mean,
                           image_std=std).save_pretrained(output_dir)
    report = {**metrics, "class_names": class_names}
    if accuracy is not None:
        report["noise_accuracy"] = {"process": noise.to_dict(), **accuracy.to_dict()}
    (output_dir / "validation.json").write_text(json.dumps(report, indent=2))
    header = "| true \\ predicted | " + " | ".join(class_names) + " |"
    rows = [f"| {name} | " + " | ".join(str(n) for n in row) + " |"
            for name, row in zip(class_names, metrics["confusion_matrix"])]
    write_model_card(
        output_dir,
        "expert",
        **run_card_fields(args, accelerator, result),
        accuracy=f"{metrics['accuracy']:.4f}",
        num_validation_images=num_validation,
        confusion_matrix="\n".join([header, "|---" * (len(class_names) + 1) + "|", *rows]),
        noise_accuracy=noise_table(noise, accuracy),
        data_description=data_description,
        num_train_images=num_train,
        class_names=", ".join(class_names),
        resolution=args.resolution,
        channels=channels,
        initialisation=f"fine-tuned from {card_reference(args.pretrained_model_name_or_path)}"
        if args.pretrained_model_name_or_path
        else "from scratch",
        architecture=f"ResNet, depths {list(model.config.depths)}, widths {list(model.config.hidden_sizes)}, "
                     f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters",
        weight_decay=args.adam_weight_decay,
    )
    if args.push_to_hub:
        push_model_folder(output_dir, args.hub_model_id or output_dir.name, args.hub_token, args.hub_private_repo)


if __name__ == "__main__":
    main(parse_args())
