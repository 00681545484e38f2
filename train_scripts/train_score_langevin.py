"""Train a class-conditional noise-conditional score network (NCSNv2) with multi-scale denoising score matching.

    accelerate launch train_scripts/train_score_langevin.py \\
        --train_data_dir ../shared/data/brain_tumor_mri/brain_tumor_mri_4class_128.npz \\
        --resolution 128 --class_conditional --use_ema --output_dir score-langevin-brain-mri

Without --train_data_dir or --dataset_name it trains on medsyn's simulated brain MRI. The result is a
``ScoreLangevinPipeline`` folder with a model card, loadable with ``ScoreLangevinPipeline.from_pretrained``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.logging import get_logger
from diffusers import UNet2DModel
from PIL import Image

from medsyn.data import image_channels, image_transform, random_affine
from medsyn.flag_spellings import accept_both_spellings
from medsyn.hub_upload import push_model_folder
from medsyn.model_card import write_model_card
from medsyn.models.preconditioning import Preconditioning, edm_preconditioning, set_preconditioning
from medsyn.models.score_unet import null_class_label
from medsyn.pipelines import ScoreLangevinPipeline
from medsyn.schedulers import AnnealedLangevinScheduler, EDMHeunScheduler, noise_schedule_from_data
from medsyn.schedulers.ncsn_rules import NoiseSchedule, langevin_step_size, num_noise_levels
from medsyn.schedulers.scheduling_annealed_langevin import geometric_sigmas
from medsyn.schedulers.scheduling_edm_heun import DEFAULT_STEPS
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
    unet_config_from_arguments,
)
from medsyn.training.differential_privacy import add_privacy_arguments, check_privacy_arguments, make_private
from medsyn.training.dsm_loss import per_value_scale
from medsyn.training.expert_noise import ExpertNoise, NoiseProcess
from medsyn.training.feature_alignment import (
    FeatureAligner,
    FrozenExpert,
    add_alignment_arguments,
    block_channels,
    describe_alignment,
)
from medsyn.training.loop import (
    TrainingResult,
    TrainingRun,
    public_image_count,
    run_card_fields,
    training_loop,
    write_training_summary,
)
from medsyn.training.score_losses import EDMLoss, NCSNLoss
from medsyn.training.script_args import (
    add_data_arguments,
    add_ema_arguments,
    add_logging_and_hub_arguments,
    add_not_applicable_arguments,
    add_optimisation_arguments,
    add_pretrained_arguments,
    check_data_arguments,
    check_not_applicable,
    load_training_data,
    pretrained_kwargs,
)
from medsyn.training.validation_images import save_validation_image
from medsyn.validation import DefaultsShown, count_argument, number_argument

logger = get_logger(__name__)


#: diffusers' flags that belong to a DDPM noise schedule, not to multi-scale denoising score matching.
NOT_APPLICABLE = {
    "--snr_gamma": "min-SNR weighting needs a DDPM schedule's SNR; the score model's loss is weighted by sigma^2 "
                   "per noise level (NCSN), which already balances the levels",
    "--noise_offset": "offset noise shifts a DDPM's Gaussian noise; the score model is trained on isotropic "
                      "Gaussian perturbations at each sigma, whose score the sampler assumes",
}

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsShown)
    add_data_arguments(parser)
    add_not_applicable_arguments(parser, NOT_APPLICABLE)
    parser.add_argument("--augment", action="store_true", help="Small random affine (MONAI DDPM tutorial); no flips.")

    model = add_class_unet_arguments(parser)
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="A ScoreLangevinPipeline folder or Hub id to fine-tune; default: a new model.")
    add_pretrained_arguments(model)

    noise = parser.add_argument_group("noise schedule (default: NCSNv2 techniques 1, 2, 4 on the data)")
    noise.add_argument("--preconditioning", type=Preconditioning, choices=list(Preconditioning),
                       default=Preconditioning.NCSN,
                       help="ncsn: NCSNv2 (unscaled input, 40-odd discrete levels drawn uniformly, Langevin sampling); "
                            "edm: Karras et al. 2022 (scaled input and output, log-normal levels, EDM Heun sampling).")
    noise.add_argument("--sigma_data", type=number_argument(0, exclusive=True), default=None,
                       help="edm: the data's standard deviation in [-1, 1]; default: measured on up to 2,000 "
                            "training images (give it under DP).")
    noise.add_argument("--p_mean", type=float, default=-1.2, help="edm: mean of ln(sigma) in training.")
    noise.add_argument("--p_std", type=number_argument(0, exclusive=True), default=1.2,
                       help="edm: standard deviation of ln(sigma) in training.")
    noise.add_argument("--sigma_max", type=number_argument(0, exclusive=True), default=None,
                       help="Default: largest pairwise data distance (ncsn); 80 (edm).")
    noise.add_argument("--sigma_min", type=number_argument(0, exclusive=True), default=None,
                       help="Smallest noise level; default 0.01 (ncsn), 0.002 (edm).")
    noise.add_argument("--num_noise_levels", type=count_argument(2), default=None, help="Default: NCSNv2 technique 2.")
    noise.add_argument("--n_steps_each", type=count_argument(), default=5,
                       help="Langevin steps per noise level when sampling.")
    noise.add_argument("--step_size", type=number_argument(0, exclusive=True), default=None,
                       help="Langevin alpha; default: technique 4.")

    add_optimisation_arguments(parser, output_dir="score-langevin-model", learning_rate=1e-4)
    add_ema_arguments(parser, decay=0.999)

    add_alignment_arguments(parser)
    add_privacy_arguments(parser)
    add_logging_and_hub_arguments(parser)
    parser.add_argument("--num_validation_images", type=count_argument(), default=4, help="Per class.")
    parser.add_argument("--validation_num_levels", type=count_argument(2), default=None,
                        help="Noise levels for validation sampling; default: the trained number.")
    parser.add_argument("--validation_guidance_scale", type=number_argument(0), default=1.0,
                        help="Guidance weight of the validation images.")

    args = accept_both_spellings(parser).parse_args(argv)
    check_data_arguments(parser, args)
    check_not_applicable(parser, args, NOT_APPLICABLE)
    check_class_unet_arguments(parser, args)
    if args.preconditioning is Preconditioning.EDM:
        for flag in ("num_noise_levels", "step_size"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag} is annealed Langevin's (ncsn); an edm model is trained on continuous levels")
    check_privacy_arguments(parser, args, unsupported={
        "--align_expert": bool(args.align_expert),
        "the default --sigma_max (measured on the training images, outside the guarantee; give --sigma_max)":
            args.sigma_max is None and not args.pretrained_model_name_or_path
            and args.preconditioning is Preconditioning.NCSN,
        "the default --sigma_data (measured on the training images, outside the guarantee; give --sigma_data)":
            args.sigma_data is None and not args.pretrained_model_name_or_path
            and args.preconditioning is Preconditioning.EDM,
    })
    return args


def data_sigma(sample: torch.Tensor) -> float:
    """EDM's sigma_data: the standard deviation of the training values in [-1, 1] (all pixels of the sample pooled)."""
    return float(sample.float().std())


def build_model_and_scheduler(args, dataset, to_tensor, num_classes, channels):
    """A new score UNet and a noise schedule from the data, or both from a pretrained pipeline."""
    if args.pretrained_model_name_or_path:
        pipeline = ScoreLangevinPipeline.from_pretrained(args.pretrained_model_name_or_path, **pretrained_kwargs(args))
        saved = Preconditioning.EDM if edm_preconditioning(pipeline.unet) else Preconditioning.NCSN
        if saved is not args.preconditioning:
            raise ValueError(f"--preconditioning {args.preconditioning}: the pretrained model is {saved}-parameterised")
        return pipeline.unet, pipeline.scheduler
    unet = UNet2DModel(**unet_config_from_arguments(args, channels, num_classes))

    def sample():
        return torch.stack([to_tensor(dataset[i]["image"]) for i in range(min(len(dataset), 2000))])

    if args.preconditioning is Preconditioning.EDM:
        sigma_data = args.sigma_data or data_sigma(sample())
        set_preconditioning(unet, Preconditioning.EDM, sigma_data)
        return unet, EDMHeunScheduler(sigma_max=args.sigma_max or 80.0, sigma_min=args.sigma_min or 0.002)
    set_preconditioning(unet, Preconditioning.NCSN)
    sigma_min = args.sigma_min or 0.01
    if args.sigma_max is None:
        schedule = noise_schedule_from_data(sample(), sigma_min=sigma_min, n_steps_each=args.n_steps_each)
    else:  # nothing is read from the images (a DP run's guarantee covers only what the gradients carry)
        levels = num_noise_levels(args.sigma_max, sigma_min, channels * args.resolution**2)
        schedule = NoiseSchedule(sigma_max=args.sigma_max, sigma_min=sigma_min, num_train_timesteps=levels,
                                 step_size=0.0, n_steps_each=args.n_steps_each)
    if args.num_noise_levels is not None:
        schedule.num_train_timesteps = args.num_noise_levels
    schedule.step_size = args.step_size or langevin_step_size(
        schedule.sigma_max, schedule.sigma_min, schedule.num_train_timesteps, schedule.n_steps_each
    )
    return unet, AnnealedLangevinScheduler(**asdict(schedule))


def build_loss(args, unet, noise_scheduler, device) -> NCSNLoss | EDMLoss:
    """The training loss of the unet's parameterisation."""
    edm = edm_preconditioning(unet)
    if edm is not None:
        return EDMLoss(edm, args.p_mean, args.p_std)
    config = noise_scheduler.config
    return NCSNLoss(geometric_sigmas(config.sigma_max, config.sigma_min, config.num_train_timesteps).float().to(device))


def build_aligner(args, unet, example: torch.Tensor, sigma_range: tuple[float, float], null_label,
                  device) -> FeatureAligner | None:
    """The feature-alignment term when --align_expert is given: the block's width from one forward pass."""
    if not args.align_expert:
        return None
    expert = FrozenExpert.from_pretrained(args.align_expert).to(device)
    labels = None if null_label is None else torch.full((1,), null_label, dtype=torch.long, device=device)
    width = block_channels(unet.to(device), args.align_block, example[None].to(device),
                           timestep=torch.tensor([sigma_range[1]], device=device), class_labels=labels)
    model_noise = ExpertNoise(NoiseProcess.VE, sigma_min=sigma_range[0], sigma_max=sigma_range[1])
    return FeatureAligner(expert, unet, args.align_block, width, model_noise, args.resolution, args.align_min_margin,
                          args.align_head_dim)


def main(args: argparse.Namespace) -> UNet2DModel:
    """Train, save the pipeline and model card (main process), and return the final network on every rank."""
    accelerator = build_accelerator(args)

    dataset, data_description = load_training_data(args, require_labels=args.class_conditional)
    class_names = list(dataset.features["label"].names) if args.class_conditional else None
    channels = image_channels(dataset)
    to_tensor = image_transform(args.resolution, center_crop=args.center_crop)
    unet, noise_scheduler = build_model_and_scheduler(
        args, dataset, to_tensor, len(class_names or []), channels
    )
    if unet.config.in_channels != channels:
        raise ValueError(f"the data has {channels} channels but the model expects {unet.config.in_channels}")
    enable_gradient_checkpointing(args, unet)
    null_label = null_class_label(unet)
    score_loss = build_loss(args, unet, noise_scheduler, accelerator.device)
    sigma_range = (noise_scheduler.config.sigma_min, noise_scheduler.config.sigma_max)

    dataloader = labelled_dataloader(dataset, to_tensor, args)
    aligner = build_aligner(args, unet, to_tensor(dataset[0]["image"]), sigma_range, null_label, accelerator.device)
    trained_parameters = list(unet.parameters()) + (list(aligner.head.parameters()) if aligner else [])
    optimizer = build_optimizer(args, trained_parameters)
    unet, optimizer, dataloader, privacy = make_private(args, accelerator, unet, optimizer, dataloader)
    unet, optimizer, dataloader = accelerator.prepare(unet, optimizer, dataloader)
    head = accelerator.prepare(aligner.head) if aligner else None
    updates_per_epoch, max_train_steps, _ = step_budget(args, len(dataloader))
    lr_scheduler = build_lr_scheduler(args, accelerator, optimizer, max_train_steps)
    ema = attach_ema(accelerator, unet, args.ema_decay, "unet_ema") if args.use_ema else None

    def loss_fn(batch, step):
        """Denoising score matching (NCSN's or EDM's), plus the alignment term when asked for."""
        clean = batch["pixel_values"]
        if args.augment:
            clean = random_affine(clean, generator=step.generator)
        labels = drop_labels(batch["labels"], null_label, args.label_drop_rate, step.generator)
        terms = score_loss(unet, clean, labels, step.generator)
        losses = {"loss": terms.loss.mean()}
        if aligner is not None:
            seen, level = (terms.noisy, terms.sigma) if args.align_on == "noisy" else (clean, None)
            losses["dsm_loss"] = losses["loss"]
            losses["align_loss"] = aligner.loss(seen, level, head)
            # dsm_loss sums over an image's values; --align_weight is relative to a per-value mean loss, as in MediSyn
            losses["loss"] = losses["loss"] + args.align_weight * per_value_scale(clean) * losses["align_loss"]
        return losses

    def validate(step):
        log_validation(args, accelerator, unet, ema, noise_scheduler, class_names, step)

    logger.info(f"{len(dataset)} images, {max_train_steps} optimiser steps, {describe_training_noise(unet, noise_scheduler)}; "
                f"sampling: {describe_sampler(noise_scheduler)}")
    run = TrainingRun(accelerator, [unet], trained_parameters, optimizer, lr_scheduler, dataloader,
                      updates_per_epoch, max_train_steps, ema, privacy)
    result = training_loop(args, run, loss_fn, tracker_project_name="score_langevin", validate=validate)

    if aligner is not None:
        aligner.features.remove()  # the hook was for training; the saved pipeline runs without it
    model = ema_or_trained_model(accelerator, unet, ema)
    if accelerator.is_main_process:
        save_pipeline(args, accelerator, model, noise_scheduler, class_names, data_description, len(dataset),
                      channels, result, alignment=describe_alignment(args, aligner))
    accelerator.end_training()
    return model


def log_validation(args, accelerator, unet, ema, noise_scheduler, class_names, step) -> None:
    pipeline = ScoreLangevinPipeline(ema_or_trained_model(accelerator, unet, ema), noise_scheduler, class_names=class_names)
    pipeline.set_progress_bar_config(disable=True)
    grid = class_sample_grid(pipeline, class_names, args.num_validation_images, args.validation_guidance_scale,
                             args.seed, num_inference_steps=args.validation_num_levels)
    save_validation_image(args, accelerator, grid, step)
    unet.train()


def save_pipeline(args, accelerator, model, noise_scheduler, class_names, data_description, num_images,
                  channels, result: TrainingResult, alignment: str) -> None:
    output_dir = Path(args.output_dir)
    pipeline = ScoreLangevinPipeline(model, noise_scheduler, class_names=class_names,
                                     default_guidance_scale=args.validation_guidance_scale)
    pipeline.save_pretrained(output_dir)
    pipeline.set_progress_bar_config(disable=True)
    grid = class_sample_grid(pipeline, class_names, args.num_validation_images, args.validation_guidance_scale,
                             args.seed, num_inference_steps=args.validation_num_levels)
    Image.fromarray(grid).save(output_dir / "samples.png")
    run_fields = run_card_fields(args, accelerator, result)
    write_training_summary(output_dir, run_fields, result)
    write_model_card(
        output_dir,
        "score_langevin",
        **run_fields,
        **class_card_fields(args, class_names, model),
        class_conditional=bool(class_names),
        sample_caption=(f"Rows: {', '.join(class_names)}" if class_names else "Unconditional samples")
        + f"; {describe_sampler(noise_scheduler, args.validation_num_levels)}, guidance {args.validation_guidance_scale}, "
        f"seed {args.seed}.",
        data_description=data_description,
        num_train_images=public_image_count(num_images, result),
        channels=channels,
        training_noise=describe_training_noise(model, noise_scheduler, args),
        default_sampler=describe_sampler(noise_scheduler),
        alignment=alignment,
    )
    if args.push_to_hub:
        push_model_folder(output_dir, args.hub_model_id or output_dir.name, args.hub_token, args.hub_private_repo)
    logger.info(f"saved the pipeline and its model card to {output_dir}")


def describe_training_noise(unet, noise_scheduler, args=None) -> str:
    """The parameterisation and the training distribution of noise levels, in one line."""
    edm = edm_preconditioning(unet)
    if edm is not None:
        levels = f", ln(sigma) ~ N({args.p_mean}, {args.p_std}^2)" if args is not None else ""
        return f"EDM preconditioning (sigma_data {edm.sigma_data:.4g}){levels}"
    config = noise_scheduler.config
    return (f"NCSN: {config.num_train_timesteps} geometric levels, sigma {config.sigma_max:.4g} to "
            f"{config.sigma_min:.4g}, drawn uniformly")


def describe_sampler(scheduler, num_inference_steps: int | None = None) -> str:
    """The saved sampler and its budget, in one line."""
    config = scheduler.config
    if isinstance(scheduler, AnnealedLangevinScheduler):
        levels = num_inference_steps or config.num_train_timesteps
        return (f"annealed Langevin, {levels} levels x {config.n_steps_each} steps, step size alpha "
                f"{config.step_size:.3g}")
    steps = num_inference_steps or DEFAULT_STEPS
    return (f"EDM Heun, {steps} steps ({2 * steps - 1} evaluations), sigma {config.sigma_max:.4g} to "
            f"{config.sigma_min:.4g}")

if __name__ == "__main__":
    main(parse_args())
