"""Train a class-conditional noise-conditional score network (NCSNv2) with multi-scale denoising score matching.

    accelerate launch train_scripts/train_score_langevin.py \\
        --train_data_dir ../shared/data/brain_tumor_mri/brain_tumor_mri_4class_128.npz \\
        --resolution 128 --class_conditional --use_ema --output_dir score-langevin-brain-mri

Without --train_data_dir or --dataset_name it trains on medsyn's simulated brain MRI. The result is a
``ScoreLangevinPipeline`` folder with a model card, loadable with ``ScoreLangevinPipeline.from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm.auto import tqdm

from medsyn.data import image_channels, image_transform, load_image_dataset, random_affine, simulated_dataset
from medsyn.model_card import write_model_card
from medsyn.models.score_unet import null_class_label, score_unet_config
from medsyn.pipelines import ScoreLangevinPipeline
from medsyn.schedulers import AnnealedLangevinScheduler, noise_schedule_from_data
from medsyn.schedulers.ncsn_rules import langevin_step_size
from medsyn.schedulers.scheduling_annealed_langevin import geometric_sigmas
from medsyn.training.checkpoints import (
    checkpoint_step,
    prune_checkpoints,
    resolve_checkpoint,
    step_generator,
)
from medsyn.training.dsm_loss import dsm_loss, perturb

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="Image folder with class sub-folders, a .csv/.jsonl manifest, or an .npz.")
    data.add_argument("--dataset_name", type=str, default=None,
                      help="A dataset saved with datasets' save_to_disk, or a Hub dataset id (needs network).")
    data.add_argument("--image_column", type=str, default="image")
    data.add_argument("--label_column", type=str, default="label")
    data.add_argument("--simulated_num_images", type=int, default=2000,
                      help="Size of the simulated brain MRI set used when no data is given.")
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--resolution", type=int, default=128)
    data.add_argument("--num_channels", type=int, default=None, choices=(1, 3),
                      help="Convert images to this many channels; default: keep the data's own.")
    data.add_argument("--augment", action="store_true", help="Small random affine (MONAI DDPM tutorial); no flips.")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="A ScoreLangevinPipeline folder or Hub id to fine-tune; default: a new model.")
    model.add_argument("--base_channels", type=int, default=64)
    model.add_argument("--channel_mult", type=int, nargs="+", default=[1, 2, 4, 8])
    model.add_argument("--layers_per_block", type=int, default=2)
    model.add_argument("--norm_num_groups", type=int, default=32)
    model.add_argument("--class_conditional", action="store_true", help="Condition on the dataset's labels.")
    model.add_argument("--label_drop_rate", type=float, default=0.1,
                       help="Fraction of labels replaced by the null class, for classifier-free guidance.")

    noise = parser.add_argument_group("noise schedule (default: NCSNv2 techniques 1, 2, 4 on the data)")
    noise.add_argument("--sigma_max", type=float, default=None, help="Default: largest pairwise data distance.")
    noise.add_argument("--sigma_min", type=float, default=0.01)
    noise.add_argument("--num_noise_levels", type=int, default=None, help="Default: NCSNv2 technique 2.")
    noise.add_argument("--n_steps_each", type=int, default=5)
    noise.add_argument("--step_size", type=float, default=None, help="Langevin alpha; default: technique 4.")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="score-langevin-model")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, default=16)
    train.add_argument("--num_train_epochs", type=int, default=100)
    train.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--lr_scheduler", type=str, default="constant")
    train.add_argument("--lr_warmup_steps", type=int, default=0)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=0.0)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--use_ema", action="store_true")
    train.add_argument("--ema_decay", type=float, default=0.999)
    train.add_argument("--mixed_precision", type=str, default=None, choices=("no", "fp16", "bf16"))
    train.add_argument("--checkpointing_steps", type=int, default=500)
    train.add_argument("--checkpoints_total_limit", type=int, default=None)
    train.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help='"latest" or a checkpoint folder; starts fresh if "latest" finds none.')

    logs = parser.add_argument_group("validation and logging")
    logs.add_argument("--validation_steps", type=int, default=500)
    logs.add_argument("--num_validation_images", type=int, default=4, help="Per class.")
    logs.add_argument("--validation_num_levels", type=int, default=None,
                      help="Noise levels for validation sampling; default: the trained number.")
    logs.add_argument("--validation_guidance_scale", type=float, default=1.0)
    logs.add_argument("--report_to", type=str, default="tensorboard")
    logs.add_argument("--logging_dir", type=str, default="logs")

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id", type=str, default=None)
    hub.add_argument("--hub_token", type=str, default=None)

    args = parser.parse_args(argv)
    if args.train_data_dir and args.dataset_name:
        parser.error("give --train_data_dir or --dataset_name, not both")
    if not 0.0 <= args.label_drop_rate < 1.0:
        parser.error(f"--label_drop_rate must be in [0, 1), got {args.label_drop_rate}")
    if args.resolution % 2 ** (len(args.channel_mult) - 1):
        parser.error(f"--resolution {args.resolution} must be divisible by 2**{len(args.channel_mult) - 1}")
    return args


def load_training_data(args: argparse.Namespace):
    """The training set with columns image, label (a ClassLabel) and a description of where it came from."""
    if args.train_data_dir:
        dataset = load_image_dataset(args.train_data_dir, channels=args.num_channels)
        description = f"`{args.train_data_dir}`"
    elif args.dataset_name:
        import datasets

        path = Path(args.dataset_name)
        dataset = datasets.load_from_disk(str(path)) if path.exists() else datasets.load_dataset(args.dataset_name)["train"]
        needed = (args.image_column, args.label_column) if args.class_conditional else (args.image_column,)
        for column in needed:
            if column not in dataset.column_names:
                raise ValueError(f"--dataset_name {args.dataset_name}: no column {column!r} ({dataset.column_names})")
        if args.label_column in dataset.column_names:
            dataset = dataset.rename_columns({args.image_column: "image", args.label_column: "label"})
            if not isinstance(dataset.features["label"], datasets.ClassLabel):  # strings or ints: name the classes
                dataset = dataset.class_encode_column("label")
        else:
            dataset = dataset.rename_column(args.image_column, "image").add_column("label", [0] * len(dataset))
        if args.num_channels:
            mode = "L" if args.num_channels == 1 else "RGB"
            dataset = dataset.map(lambda row: {"image": row["image"].convert(mode)})
        description = f"`{args.dataset_name}`"
    else:
        dataset = simulated_dataset(args.simulated_num_images, resolution=args.resolution, seed=args.seed)
        description = f"medsyn simulated brain MRI ({args.simulated_num_images} images, seed {args.seed})"
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    return dataset, description


def build_model_and_scheduler(args, dataset, to_tensor, num_classes, channels):
    """A new score UNet and a noise schedule from the data, or both from a pretrained pipeline."""
    if args.pretrained_model_name_or_path:
        pipeline = ScoreLangevinPipeline.from_pretrained(args.pretrained_model_name_or_path)
        return pipeline.unet, pipeline.scheduler
    unet = UNet2DModel(
        **score_unet_config(
            sample_size=args.resolution,
            in_channels=channels,
            num_classes=num_classes if args.class_conditional else None,
            base_channels=args.base_channels,
            channel_mult=tuple(args.channel_mult),
            layers_per_block=args.layers_per_block,
            norm_num_groups=args.norm_num_groups,
        )
    )
    sample = torch.stack([to_tensor(dataset[i]["image"]) for i in range(min(len(dataset), 2000))])
    schedule = noise_schedule_from_data(sample, sigma_min=args.sigma_min, n_steps_each=args.n_steps_each)
    if args.sigma_max is not None:
        schedule.sigma_max = args.sigma_max
    if args.num_noise_levels is not None:
        schedule.num_train_timesteps = args.num_noise_levels
    schedule.step_size = args.step_size or langevin_step_size(
        schedule.sigma_max, schedule.sigma_min, schedule.num_train_timesteps, schedule.n_steps_each
    )
    return unet, AnnealedLangevinScheduler(**asdict(schedule))


def sample_grid(pipeline, class_names, per_class, num_levels, guidance_scale, seed):
    """A (classes x per_class) grid of samples as a uint8 array, rows in class order."""
    labels = [c for c in range(len(class_names)) for _ in range(per_class)] if class_names else None
    images = pipeline(
        batch_size=per_class,
        class_labels=labels,
        num_inference_steps=num_levels,
        guidance_scale=guidance_scale if labels else 1.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    images = np.round(images * 255).astype(np.uint8)
    rows = max(1, len(class_names or [None]))
    grid = images.reshape(rows, per_class, *images.shape[1:]).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * images.shape[1], per_class * images.shape[2], images.shape[3])
    return grid[..., 0] if grid.shape[-1] == 1 else grid


def main(args: argparse.Namespace) -> UNet2DModel:
    """Train, save the pipeline and model card (main process), and return the final network on every rank."""
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    dataset, data_description = load_training_data(args)
    class_names = list(dataset.features["label"].names) if args.class_conditional else None
    channels = image_channels(dataset)
    to_tensor = image_transform(args.resolution)
    unet, noise_scheduler = build_model_and_scheduler(
        args, dataset, to_tensor, len(class_names or []), channels
    )
    if unet.config.in_channels != channels:
        raise ValueError(f"the data has {channels} channels but the model expects {unet.config.in_channels}")
    null_label = null_class_label(unet)
    train_sigmas = geometric_sigmas(
        noise_scheduler.config.sigma_max, noise_scheduler.config.sigma_min, noise_scheduler.config.num_train_timesteps
    ).float().to(accelerator.device)

    def collate(rows):
        pixels = torch.stack([to_tensor(row["image"]) for row in rows])
        return {"pixel_values": pixels, "labels": torch.tensor([row["label"] for row in rows], dtype=torch.long)}

    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
        num_workers=args.dataloader_num_workers, drop_last=len(dataset) >= args.train_batch_size,
    )
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )
    updates_per_epoch = math.ceil(len(dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    ema = None
    if args.use_ema:
        ema = EMAModel(accelerator.unwrap_model(unet).parameters(), decay=args.ema_decay,
                       model_cls=UNet2DModel, model_config=accelerator.unwrap_model(unet).config)
        ema.to(accelerator.device)

        def save_ema(models, weights, checkpoint_dir):  # safetensors, not a pickle, like diffusers' examples
            if accelerator.is_main_process:
                ema.save_pretrained(os.path.join(checkpoint_dir, "unet_ema"))

        def load_ema(models, checkpoint_dir):
            ema.load_state_dict(EMAModel.from_pretrained(os.path.join(checkpoint_dir, "unet_ema"), UNet2DModel).state_dict())
            ema.to(accelerator.device)

        accelerator.register_save_state_pre_hook(save_ema)
        accelerator.register_load_state_pre_hook(load_ema)
    if accelerator.is_main_process:
        accelerator.init_trackers("score_langevin", config={k: str(v) for k, v in vars(args).items()})

    global_step, first_epoch, resume_batches = 0, 0, 0
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        accelerator.load_state(str(checkpoint))
        global_step = checkpoint_step(checkpoint)
        first_epoch = global_step // updates_per_epoch
        resume_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    logger.info(f"{len(dataset)} images, {max_train_steps} optimiser steps, {num_epochs} epochs, "
                f"{noise_scheduler.config.num_train_timesteps} noise levels "
                f"(sigma {noise_scheduler.config.sigma_max:.3g} to {noise_scheduler.config.sigma_min:.3g})")
    progress = tqdm(range(max_train_steps), initial=global_step, disable=not accelerator.is_local_main_process)
    recent_losses: list[float] = []
    micro_step = global_step * args.gradient_accumulation_steps
    for epoch in range(first_epoch, num_epochs):
        unet.train()
        dataloader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(dataloader, resume_batches) if epoch == first_epoch else dataloader
        for batch in batches:
            generator = step_generator(args.seed, micro_step, accelerator.process_index, accelerator.device)
            micro_step += 1
            clean = batch["pixel_values"]
            if args.augment:
                clean = random_affine(clean, generator=generator)
            labels = None
            if null_label is not None:
                drop = torch.rand(clean.shape[0], generator=generator, device=clean.device) < args.label_drop_rate
                labels = torch.where(drop, torch.full_like(batch["labels"], null_label), batch["labels"])
            with accelerator.accumulate(unet):
                noisy, noise, sigma = perturb(clean, train_sigmas, generator=generator)
                score = unet(noisy, sigma, class_labels=labels).sample
                loss = dsm_loss(score.float(), noise.float(), sigma.float()).mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {global_step}; lower --learning_rate")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                if ema is not None:
                    ema.step(accelerator.unwrap_model(unet).parameters())
                global_step += 1
                progress.update(1)
                step_loss = accelerator.gather(loss.detach()[None]).mean().item()
                recent_losses = (recent_losses + [step_loss])[-50:]
                accelerator.log({"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
                progress.set_postfix(loss=f"{step_loss:.4g}")
                if global_step % args.checkpointing_steps == 0:
                    if accelerator.is_main_process:
                        prune_checkpoints(output_dir, args.checkpoints_total_limit)
                    accelerator.wait_for_everyone()
                    accelerator.save_state(str(output_dir / f"checkpoint-{global_step}"))
                if global_step % args.validation_steps == 0 and accelerator.is_main_process:
                    log_validation(args, accelerator, unet, ema, noise_scheduler, class_names, global_step)
                if global_step >= max_train_steps:
                    break
        if global_step >= max_train_steps:
            break

    accelerator.wait_for_everyone()
    model = final_unet(accelerator, unet, ema)
    if accelerator.is_main_process:
        save_pipeline(args, accelerator, model, noise_scheduler, class_names, data_description, len(dataset),
                      channels, global_step, recent_losses)
    accelerator.end_training()
    return model


def final_unet(accelerator, unet, ema) -> UNet2DModel:
    """The trained network, with the EMA weights when EMA is on, in eval mode."""
    model = accelerator.unwrap_model(unet)
    if ema is not None:
        model = UNet2DModel.from_config(model.config).to(accelerator.device)
        ema.copy_to(model.parameters())
    return model.eval()


def log_validation(args, accelerator, unet, ema, noise_scheduler, class_names, step) -> None:
    pipeline = ScoreLangevinPipeline(final_unet(accelerator, unet, ema), noise_scheduler, class_names=class_names)
    pipeline.set_progress_bar_config(disable=True)
    grid = sample_grid(pipeline, class_names, args.num_validation_images, args.validation_num_levels,
                       args.validation_guidance_scale, args.seed)
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(exist_ok=True)
    Image.fromarray(grid).save(folder / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", grid if grid.ndim == 3 else grid[..., None], step, dataformats="HWC")
    unet.train()


def save_pipeline(args, accelerator, model, noise_scheduler, class_names, data_description, num_images,
                  channels, global_step, recent_losses) -> None:
    output_dir = Path(args.output_dir)
    pipeline = ScoreLangevinPipeline(model, noise_scheduler, class_names=class_names)
    pipeline.save_pretrained(output_dir)
    pipeline.set_progress_bar_config(disable=True)
    grid = sample_grid(pipeline, class_names, args.num_validation_images, args.validation_num_levels,
                       args.validation_guidance_scale, args.seed)
    Image.fromarray(grid).save(output_dir / "samples.png")
    config = noise_scheduler.config
    levels_used = args.validation_num_levels or config.num_train_timesteps
    write_model_card(
        output_dir,
        "score_langevin",
        model_name=output_dir.name,
        repo_id=args.hub_model_id or str(output_dir),
        example_labels=json.dumps(class_names[:1] * 4) if class_names else "None",
        sample_grid="samples.png",
        sample_caption=(f"Rows: {', '.join(class_names)}" if class_names else "Unconditional samples")
        + f"; {levels_used} noise levels x {config.n_steps_each} steps, guidance {args.validation_guidance_scale}, "
        f"seed {args.seed}.",
        data_description=data_description,
        num_train_images=num_images,
        class_names=", ".join(class_names) if class_names else "unconditional",
        resolution=args.resolution if not args.pretrained_model_name_or_path else model.config.sample_size,
        channels=channels,
        train_steps=global_step,
        batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_processes=accelerator.num_processes,
        learning_rate=args.learning_rate,
        ema=f"decay {args.ema_decay}" if args.use_ema else "off",
        mixed_precision=accelerator.mixed_precision,
        num_levels=config.num_train_timesteps,
        sigma_max=f"{config.sigma_max:.4g}",
        sigma_min=f"{config.sigma_min:.4g}",
        n_steps_each=config.n_steps_each,
        step_size=f"{config.step_size:.3g}",
        label_drop_rate=args.label_drop_rate if class_names else "n/a",
        final_loss=f"{np.mean(recent_losses):.4f}" if recent_losses else "n/a",
        unet_summary=f"UNet2DModel, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"channels {list(model.config.block_out_channels)}",
    )
    if args.push_to_hub:
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token).repo_id
        upload_folder(repo_id=repo_id, folder_path=output_dir, token=args.hub_token,
                      ignore_patterns=["checkpoint-*", "logs/*", "validation/*"])


if __name__ == "__main__":
    main(parse_args())
