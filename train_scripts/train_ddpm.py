"""Train a class-conditional pixel-space DDPM (the MONAI tutorial's method, with classifier-free guidance).

    accelerate launch train_scripts/train_ddpm.py \\
        --train_data_dir ../shared/data/brain_tumor_mri/brain_tumor_mri_4class_128.npz \\
        --resolution 128 --class_conditional --use_ema --output_dir ddpm-brain-mri

The baseline the score model is measured against: the same UNet (``medsyn.models.ddpm_unet``), 1,000 training
timesteps, epsilon or v prediction, sampled with any of diffusers' schedulers (DPM-Solver++ 2M by default, 25 steps).
Without --train_data_dir or --dataset_name it trains on medsyn's simulated brain MRI. The result is a
``ClassConditionalDDPMPipeline`` folder with a model card.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from accelerate.logging import get_logger
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from PIL import Image

from medsyn.data import image_channels, image_transform, random_affine
from medsyn.flag_spellings import accept_both_spellings
from medsyn.hub_upload import push_model_folder
from medsyn.model_card import write_model_card
from medsyn.models.ddpm_unet import ddpm_unet_config
from medsyn.models.score_unet import null_class_label
from medsyn.pipelines import ClassConditionalDDPMPipeline
from medsyn.training.accelerator import (
    attach_ema,
    build_accelerator,
    build_lr_scheduler,
    build_optimizer,
    ema_or_trained_model,
    enable_gradient_checkpointing,
    step_budget,
)
from medsyn.training.class_conditional import (
    add_class_unet_arguments,
    check_class_unet_arguments,
    class_card_fields,
    class_sample_grid,
    drop_labels,
    labelled_dataloader,
)
from medsyn.training.denoising_loss import denoising_loss, noised_with_target
from medsyn.training.differential_privacy import add_privacy_arguments, check_privacy_arguments, make_private
from medsyn.training.loop import (
    TrainingResult,
    TrainingRun,
    public_image_count,
    run_card_fields,
    training_loop,
    write_training_summary,
)
from medsyn.training.script_args import (
    add_data_arguments,
    add_denoising_objective_arguments,
    add_ema_arguments,
    add_logging_and_hub_arguments,
    add_optimisation_arguments,
    add_pretrained_arguments,
    check_data_arguments,
    load_training_data,
    pretrained_kwargs,
)
from medsyn.training.validation_images import save_validation_image
from medsyn.validation import DefaultsShown, count_argument, number_argument

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsShown)
    add_data_arguments(parser)
    parser.add_argument("--augment", action="store_true", help="Small random affine (MONAI DDPM tutorial); no flips.")

    model = add_class_unet_arguments(parser)
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="A ClassConditionalDDPMPipeline folder or Hub id to fine-tune; default: a new model.")
    add_pretrained_arguments(model)

    noise = parser.add_argument_group("noise schedule (a new model; a pretrained one keeps its own)")
    noise.add_argument("--num_train_timesteps", type=count_argument(2), default=1000, help="Diffusion timesteps.")
    noise.add_argument("--beta_schedule", type=str, default="linear",
                       choices=("linear", "scaled_linear", "squaredcos_cap_v2"),
                       help="diffusers' beta schedule (linear 1e-4 to 0.02 is DDPM's; squaredcos_cap_v2 is cosine).")
    noise.add_argument("--beta_start", type=number_argument(0, exclusive=True), default=1e-4,
                       help="First beta of the linear schedules (DDPM's 1e-4; MONAI's tutorial 0.0015).")
    noise.add_argument("--beta_end", type=number_argument(0, exclusive=True), default=0.02,
                       help="Last beta of the linear schedules (DDPM's 0.02; MONAI's tutorial 0.0195).")
    add_denoising_objective_arguments(noise)

    add_optimisation_arguments(parser, output_dir="ddpm-model", learning_rate=1e-4)
    add_ema_arguments(parser, decay=0.999)
    add_privacy_arguments(parser)
    add_logging_and_hub_arguments(parser)
    parser.add_argument("--num_validation_images", type=count_argument(), default=4, help="Per class.")
    parser.add_argument("--validation_inference_steps", type=count_argument(), default=25,
                        help="DPM-Solver++ steps of the validation images.")
    parser.add_argument("--validation_guidance_scale", type=number_argument(0), default=1.0,
                        help="Guidance weight of the validation images.")

    args = accept_both_spellings(parser).parse_args(argv)
    check_data_arguments(parser, args)
    check_class_unet_arguments(parser, args)
    check_privacy_arguments(parser, args)
    if args.validation_inference_steps > args.num_train_timesteps:
        parser.error(f"--validation_inference_steps {args.validation_inference_steps} exceeds "
                     f"--num_train_timesteps {args.num_train_timesteps}")
    return args


def build_model_and_scheduler(args, num_classes: int, channels: int) -> tuple[UNet2DModel, DDPMScheduler]:
    """A new unet and DDPM noise schedule, or both from a pretrained pipeline (its scheduler's config)."""
    if args.pretrained_model_name_or_path:
        pipeline = ClassConditionalDDPMPipeline.from_pretrained(args.pretrained_model_name_or_path,
                                                                **pretrained_kwargs(args))
        return pipeline.unet, DDPMScheduler.from_config(pipeline.scheduler.config)
    unet = UNet2DModel(**ddpm_unet_config(
        sample_size=args.resolution, in_channels=channels, num_classes=num_classes if args.class_conditional else None,
        base_channels=args.base_channels, channel_mult=tuple(args.channel_mult),
        layers_per_block=args.layers_per_block, norm_num_groups=args.norm_num_groups,
    ))
    scheduler = DDPMScheduler(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
                              beta_start=args.beta_start, beta_end=args.beta_end,
                              prediction_type=args.prediction_type, clip_sample=False)
    return unet, scheduler


def main(args: argparse.Namespace) -> UNet2DModel:
    """Train, save the pipeline and model card (main process), and return the final network on every rank."""
    accelerator = build_accelerator(args)
    dataset, data_description = load_training_data(args, require_labels=args.class_conditional)
    class_names = list(dataset.features["label"].names) if args.class_conditional else None
    channels = image_channels(dataset)
    unet, noise_scheduler = build_model_and_scheduler(args, len(class_names or []), channels)
    if unet.config.in_channels != channels:
        raise ValueError(f"the data has {channels} channels but the model expects {unet.config.in_channels}")
    enable_gradient_checkpointing(args, unet)
    null_label = null_class_label(unet)
    dataloader = labelled_dataloader(dataset, image_transform(args.resolution, center_crop=args.center_crop), args)
    optimizer = build_optimizer(args, unet.parameters())
    unet, optimizer, dataloader, privacy = make_private(args, accelerator, unet, optimizer, dataloader)
    unet, optimizer, dataloader = accelerator.prepare(unet, optimizer, dataloader)
    updates_per_epoch, max_train_steps, _ = step_budget(args, len(dataloader))
    lr_scheduler = build_lr_scheduler(args, accelerator, optimizer, max_train_steps)
    ema = attach_ema(accelerator, unet, args.ema_decay, "unet_ema") if args.use_ema else None
    num_timesteps = noise_scheduler.config.num_train_timesteps

    def loss_fn(batch, step):
        """Ho et al.'s simple loss: the noise (or v) at a uniform timestep, min-SNR weighted when asked."""
        clean = batch["pixel_values"]
        if args.augment:
            clean = random_affine(clean, generator=step.generator)
        labels = drop_labels(batch["labels"], null_label, args.label_drop_rate, step.generator)
        noisy, timesteps, target = noised_with_target(noise_scheduler, clean, step.generator, args.noise_offset)
        prediction = unet(noisy, timesteps, class_labels=labels).sample
        return {"loss": denoising_loss(prediction, target, timesteps, noise_scheduler, args.snr_gamma)}

    def validate(step):
        pipeline = assemble_pipeline(accelerator, unet, ema, noise_scheduler, class_names,
                                     args.validation_guidance_scale)
        grid = class_sample_grid(pipeline, class_names, args.num_validation_images, args.validation_guidance_scale,
                                 args.seed,
                                 num_inference_steps=args.validation_inference_steps)
        save_validation_image(args, accelerator, grid, step)

    logger.info(f"{len(dataset)} images, {max_train_steps} optimiser steps, {num_timesteps} timesteps "
                f"({noise_scheduler.config.beta_schedule}, {noise_scheduler.config.prediction_type})")
    run = TrainingRun(accelerator, [unet], list(unet.parameters()), optimizer, lr_scheduler, dataloader,
                      updates_per_epoch, max_train_steps, ema, privacy)
    result = training_loop(args, run, loss_fn, tracker_project_name="ddpm", validate=validate)

    pipeline = assemble_pipeline(accelerator, unet, ema, noise_scheduler, class_names, args.validation_guidance_scale)
    if accelerator.is_main_process:
        save_pipeline(args, accelerator, pipeline, data_description, len(dataset), channels, result)
    accelerator.end_training()
    return pipeline.unet


def assemble_pipeline(accelerator, unet, ema, noise_scheduler: DDPMScheduler, class_names,
                      guidance_scale: float) -> ClassConditionalDDPMPipeline:
    """The trained (EMA) unet with DPM-Solver++ 2M on the training schedule, good at 25 steps; its default guidance
    the one its samples are shown at."""
    solver = DPMSolverMultistepScheduler.from_config(noise_scheduler.config)
    pipeline = ClassConditionalDDPMPipeline(ema_or_trained_model(accelerator, unet, ema), solver,
                                            class_names=class_names,
                                            default_guidance_scale=guidance_scale)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_pipeline(args, accelerator, pipeline: ClassConditionalDDPMPipeline, data_description, num_images, channels,
                  result: TrainingResult) -> None:
    output_dir = Path(args.output_dir)
    pipeline.save_pretrained(output_dir)
    class_names = pipeline.class_names
    grid = class_sample_grid(pipeline, class_names, args.num_validation_images, args.validation_guidance_scale,
                             args.seed, num_inference_steps=args.validation_inference_steps)
    Image.fromarray(grid).save(output_dir / "samples.png")
    config, model = pipeline.scheduler.config, pipeline.unet
    run_fields = run_card_fields(args, accelerator, result)
    write_training_summary(output_dir, run_fields, result)
    write_model_card(
        output_dir,
        "ddpm",
        **run_fields,
        **class_card_fields(args, class_names, model),
        class_conditional=bool(class_names),
        sample_caption=(f"Rows: {', '.join(class_names)}" if class_names else "Unconditional samples")
        + f"; DPM-Solver++ 2M, {args.validation_inference_steps} steps, guidance {args.validation_guidance_scale}, "
        f"seed {args.seed}.",
        data_description=data_description,
        num_train_images=public_image_count(num_images, result),
        channels=channels,
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule if (config.beta_start, config.beta_end) == (1e-4, 0.02)
        or config.beta_schedule == "squaredcos_cap_v2"
        else f"{config.beta_schedule} ({config.beta_start:g} to {config.beta_end:g})",
        prediction_type=config.prediction_type,
        loss_weighting=f"min-SNR, gamma {args.snr_gamma}" if args.snr_gamma else "uniform (Ho et al.'s simple loss)",
    )
    if args.push_to_hub:
        push_model_folder(output_dir, args.hub_model_id or output_dir.name, args.hub_token, args.hub_private_repo)


if __name__ == "__main__":
    main(parse_args())
