"""Train the autoencoder of a MediSyn latent diffusion model (stage 1): a diffusers ``AutoencoderKL``.

    accelerate launch train_scripts/train_autoencoder.py \\
        --train_data_dir ../shared/data/brain_tumor_mri/brain_tumor_mri_4class_128.npz \\
        --resolution 128 --output_dir medisyn-vae-brain-mri

MONAI's latent-diffusion recipe: L1 reconstruction + KL (weight 1e-6) + an optional perceptual loss (on a local
feature network, ``--perceptual_network``) + a PatchGAN adversarial loss switched on after a warm-up, with a faster
discriminator. Without --train_data_dir or --dataset_name it trains on medsyn's simulated brain MRI. The result is
an ``AutoencoderKL`` folder whose config carries the latent scaling factor (1 / std of the training latents), ready
for ``train_medisyn.py --vae_model_name_or_path``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import AutoencoderKL
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from PIL import Image
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from medsyn.data import image_channels, image_transform
from medsyn.flag_spellings import accept_both_spellings
from medsyn.hub_upload import push_model_folder
from medsyn.model_card import card_reference, write_model_card
from medsyn.models.latent_diffusion import autoencoder_config, latent_size, vae_scale_factor
from medsyn.training.accelerator import (
    build_accelerator,
    build_lr_scheduler,
    build_optimizer,
    enable_gradient_checkpointing,
    step_budget,
)
from medsyn.training.autoencoder_losses import FeaturePerceptualLoss, VariationalReconstruction, adversarial_weight
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
from medsyn.training.validation_images import image_grid, save_validation_image
from medsyn.validation import DefaultsShown, count_argument, number_argument

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsShown)
    add_data_arguments(parser)
    add_validation_fraction_argument(parser, default=0.05)

    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="An AutoencoderKL folder or Hub id to fine-tune; default: a new model.")
    add_pretrained_arguments(model)
    model.add_argument("--subfolder", type=str, default=None, help='e.g. "vae" inside a pipeline folder.')
    model.add_argument("--latent_channels", type=count_argument(), default=4, help="Channels of the latent space.")
    model.add_argument("--block_out_channels", type=count_argument(), nargs="+", default=[64, 128, 256],
                       help="Channels per level; the image is downsampled 2**(levels - 1) times.")
    model.add_argument("--layers_per_block", type=count_argument(), default=2, help="Residual blocks per level.")
    model.add_argument("--norm_num_groups", type=count_argument(), default=32,
                       help="Groups of the group normalisation.")

    losses = parser.add_argument_group("losses")
    losses.add_argument("--kl_weight", type=number_argument(0), default=1e-6, help="Weight of the KL term.")
    losses.add_argument("--perceptual_network", type=str, default=None,
                        help="A local transformers vision model (e.g. a ResNet50) for the perceptual loss.")
    losses.add_argument("--perceptual_weight", type=number_argument(0), default=None,
                        help="Default 0.001 with --perceptual_network; the loss is off without one.")
    losses.add_argument("--adversarial_weight", type=number_argument(0), default=0.01,
                        help="0 turns the discriminator off.")
    losses.add_argument("--adversarial_warmup_steps", type=count_argument(0), default=1000,
                        help="Optimiser steps of reconstruction-only training before the adversarial loss starts.")
    losses.add_argument("--discriminator_learning_rate", type=number_argument(0, exclusive=True), default=5e-4,
                        help="Learning rate of the PatchGAN discriminator.")
    losses.add_argument("--discriminator_channels", type=count_argument(), default=64,
                        help="Channels of the discriminator's first layer.")
    losses.add_argument("--discriminator_layers", type=count_argument(), default=3,
                        help="Strided layers of the discriminator.")

    add_optimisation_arguments(parser, output_dir="medisyn-vae", learning_rate=1e-4)
    add_logging_and_hub_arguments(parser)
    parser.add_argument("--num_validation_images", type=count_argument(), default=8,
                        help="Reconstructions shown per log.")
    parser.add_argument("--scaling_factor_images", type=count_argument(), default=512,
                        help="Training images encoded to measure the latents' standard deviation.")

    args = accept_both_spellings(parser).parse_args(argv)
    check_data_arguments(parser, args)
    if args.perceptual_weight is None:
        args.perceptual_weight = 0.001 if args.perceptual_network else 0.0
    elif args.perceptual_weight > 0 and not args.perceptual_network:
        parser.error("--perceptual_weight needs --perceptual_network: a local transformers vision model (no "
                     "perceptual network ships with medsyn, and none is downloaded)")
    if not args.pretrained_model_name_or_path and args.resolution % 2 ** (len(args.block_out_channels) - 1):
        parser.error(f"--resolution {args.resolution} must be divisible by 2**{len(args.block_out_channels) - 1}")
    return args


def build_autoencoder(args: argparse.Namespace, channels: int) -> AutoencoderKL:
    if args.pretrained_model_name_or_path:
        return AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder=args.subfolder,
                                             **pretrained_kwargs(args))
    config = autoencoder_config(
        in_channels=channels,
        latent_channels=args.latent_channels,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        norm_num_groups=args.norm_num_groups,
        sample_size=args.resolution,
    )
    return AutoencoderKL(**config)


@torch.no_grad()
def evaluate_reconstruction(vae: AutoencoderKL, loader, device) -> tuple[dict[str, float], torch.Tensor]:
    """PSNR and SSIM (images in [0, 1]) of the posterior-mean reconstructions, and the first batch's pairs."""
    vae.eval()
    # Only the main process validates: no gathering from the other ranks (it would wait for them forever).
    psnr = PeakSignalNoiseRatio(data_range=1.0, sync_on_compute=False).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False).to(device)
    shown = None
    for batch in loader:
        images = batch["pixel_values"].to(device)
        reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
        real, fake = images / 2 + 0.5, reconstruction / 2 + 0.5
        psnr.update(fake, real)
        ssim.update(fake, real)
        if shown is None:
            shown = torch.cat([real, fake], dim=-2)  # each column: original above, reconstruction below
    return {"psnr": psnr.compute().item(), "ssim": ssim.compute().item()}, shown


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, loader, device, max_images: int, seed: int) -> float:
    """1 / std of sampled training latents: the factor that gives the diffusion model unit-variance inputs."""
    vae.eval()
    generator = torch.Generator(device).manual_seed(seed)
    latents, seen = [], 0
    for batch in loader:
        images = batch["pixel_values"][: max_images - seen].to(device)
        latents.append(vae.encode(images).latent_dist.sample(generator=generator).float().flatten())
        seen += images.shape[0]
        if seen >= max_images:
            break
    return 1.0 / torch.cat(latents).std().item()


def main(args: argparse.Namespace) -> AutoencoderKL:
    """Train, save the autoencoder and model card (main process), and return the final model on every rank."""
    output_dir = Path(args.output_dir)
    accelerator = build_accelerator(args)
    dataset, data_description = load_training_data(args)
    train_set, validation_set = split_validation(dataset, args.validation_fraction, args.seed)
    channels = image_channels(dataset)
    to_tensor = image_transform(args.resolution, center_crop=args.center_crop)
    vae = build_autoencoder(args, channels)
    enable_gradient_checkpointing(args, vae)
    if vae.config.in_channels != channels:
        raise ValueError(f"the data has {channels} channels but the autoencoder expects {vae.config.in_channels}")
    side = latent_size(vae, args.resolution)
    discriminator = PatchDiscriminator(
        spatial_dims=2, channels=args.discriminator_channels, in_channels=channels, out_channels=1,
        num_layers_d=args.discriminator_layers,
    )
    adversarial_loss = PatchAdversarialLoss(criterion="least_squares")
    perceptual_loss = None
    if args.perceptual_network:
        perceptual_loss = FeaturePerceptualLoss.from_pretrained(args.perceptual_network).to(accelerator.device)
    else:
        logger.info("perceptual loss off: no --perceptual_network given (medsyn ships none and downloads none)")

    def collate(rows):
        return {"pixel_values": torch.stack([to_tensor(row["image"]) for row in rows])}

    loader_kwargs = dict(batch_size=args.train_batch_size, collate_fn=collate, num_workers=args.dataloader_num_workers)
    train_loader = torch.utils.data.DataLoader(
        train_set, shuffle=True, drop_last=len(train_set) >= args.train_batch_size, **loader_kwargs
    )
    validation_loader = torch.utils.data.DataLoader(validation_set, shuffle=False, **loader_kwargs)
    autoencoder = VariationalReconstruction(vae)
    optimizer = build_optimizer(args, autoencoder.parameters())
    optimizer_d = build_optimizer(args, discriminator.parameters(), learning_rate=args.discriminator_learning_rate,
                                  weight_decay=0.01)
    autoencoder, discriminator, optimizer, optimizer_d, train_loader = accelerator.prepare(
        autoencoder, discriminator, optimizer, optimizer_d, train_loader
    )
    updates_per_epoch, max_train_steps, _ = step_budget(args, len(train_loader))
    lr_scheduler = build_lr_scheduler(args, accelerator, optimizer, max_train_steps)
    fakes: list[torch.Tensor] = []  # this step's reconstructions, for the discriminator's update after it

    def loss_fn(batch, step):
        """L1 + KL (+ perceptual, + the adversarial term once the discriminator is warmed up)."""
        images = batch["pixel_values"]
        adv_weight = adversarial_weight(step.global_step, args.adversarial_weight, args.adversarial_warmup_steps)
        reconstruction, kl = autoencoder(images, step.generator)
        losses = {"l1": F.l1_loss(reconstruction.float(), images.float()), "kl": kl}
        if perceptual_loss is not None:
            losses["perceptual"] = perceptual_loss(reconstruction.float(), images.float())
        if adv_weight > 0:
            # The generator's adversarial term goes through a frozen copy of the discriminator's weights, so
            # it adds no gradient to the discriminator (which would accumulate into its own update).
            critic = accelerator.unwrap_model(discriminator).requires_grad_(False)
            with accelerator.autocast():
                logits = critic(reconstruction.contiguous())[-1]
            critic.requires_grad_(True)
            losses["adversarial"] = adversarial_loss(logits.float(), target_is_real=True, for_discriminator=False)
            fakes[:] = [reconstruction.detach()]
        losses["loss"] = (losses["l1"] + args.kl_weight * kl + args.perceptual_weight * losses.get("perceptual", 0)
                          + adv_weight * losses.get("adversarial", 0))
        losses["adversarial_weight"] = adv_weight
        return losses

    def update_discriminator(batch, losses):
        if not fakes:
            return {}
        # One forward for fakes and reals: DDP allows one forward per backward.
        fake, real = discriminator(torch.cat([fakes.pop(), batch["pixel_values"]]).contiguous())[-1].chunk(2)
        loss = 0.5 * (adversarial_loss(fake.float(), target_is_real=False, for_discriminator=True)
                      + adversarial_loss(real.float(), target_is_real=True, for_discriminator=True))
        accelerator.backward(loss)
        optimizer_d.step()
        optimizer_d.zero_grad()
        return {"discriminator": loss}

    def validate(step):
        log_validation(args, accelerator, accelerator.unwrap_model(autoencoder).vae, validation_loader, step)

    logger.info(f"{len(train_set)} training and {len(validation_set)} validation images, {max_train_steps} steps, "
                f"latents {vae.config.latent_channels} x {side}^2")
    run = TrainingRun(accelerator, [autoencoder, discriminator], list(autoencoder.parameters()), optimizer,
                      lr_scheduler, train_loader, updates_per_epoch, max_train_steps)
    result = training_loop(args, run, loss_fn, tracker_project_name="autoencoder",
                           after_update=update_discriminator, validate=validate)

    model = accelerator.unwrap_model(autoencoder).vae.eval()
    if accelerator.is_main_process:
        scaling_factor = latent_scaling_factor(model, train_loader, accelerator.device, args.scaling_factor_images,
                                               args.seed)
        model.register_to_config(scaling_factor=scaling_factor)
        metrics, strip = log_validation(args, accelerator, model, validation_loader, result.global_step)
        model.save_pretrained(output_dir)
        Image.fromarray(strip).save(output_dir / "reconstructions.png")
        write_autoencoder_card(args, accelerator, model, data_description, len(train_set), len(validation_set),
                               channels, metrics, result)
        if args.push_to_hub:
            push_model_folder(output_dir, args.hub_model_id or output_dir.name, args.hub_token, args.hub_private_repo)
    accelerator.end_training()
    return model


def log_validation(args, accelerator, vae: AutoencoderKL, loader, step: int) -> tuple[dict[str, float], np.ndarray]:
    """PSNR/SSIM on the held-out images, logged, with a strip of originals over reconstructions saved as PNG."""
    metrics, pairs = evaluate_reconstruction(vae, loader, accelerator.device)
    shown = pairs[: args.num_validation_images].permute(0, 2, 3, 1).cpu().numpy()
    strip = image_grid(shown, rows=1)  # each column: an original above its reconstruction
    save_validation_image(args, accelerator, strip, step, tag="reconstructions")
    accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=step)
    logger.info(f"step {step}: validation PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}")
    return metrics, strip


def write_autoencoder_card(args, accelerator, vae, data_description, num_train, num_validation, channels, metrics,
                           result: TrainingResult) -> None:
    output_dir = Path(args.output_dir)
    side = latent_size(vae, args.resolution)
    adversarial = (f"weight {args.adversarial_weight} from step {args.adversarial_warmup_steps}, discriminator lr "
                   f"{args.discriminator_learning_rate}" if args.adversarial_weight > 0 else "off")
    write_model_card(
        output_dir,
        "autoencoder",
        **run_card_fields(args, accelerator, result),
        num_shown=min(args.num_validation_images, num_validation),
        data_description=data_description,
        num_train_images=num_train,
        num_validation_images=num_validation,
        resolution=args.resolution,
        channels=channels,
        latent_shape=f"{vae.config.latent_channels} x {side} x {side}",
        factor=vae_scale_factor(vae),
        psnr=f"{metrics['psnr']:.2f}",
        ssim=f"{metrics['ssim']:.4f}",
        scaling_factor=f"{vae.config.scaling_factor:.5g}",
        kl_weight=args.kl_weight,
        perceptual=f"weight {args.perceptual_weight} on {card_reference(args.perceptual_network)}"
        if args.perceptual_network
        else "off (no feature network given)",
        adversarial=adversarial,
        final_l1=result.mean("l1"),
        final_kl=result.mean("kl"),
        parameters=f"{sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, channels "
        f"{list(vae.config.block_out_channels)}",
    )


if __name__ == "__main__":
    main(parse_args())
