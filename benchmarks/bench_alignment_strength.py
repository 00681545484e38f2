"""How strongly does the alignment term pull on the score UNet, next to denoising score matching?

``--align_weight`` multiplies ``1 - cosine`` (at most 2 per image) against a per-value mean squared error, which
for the score model's per-image DSM *sum* means scaling the term by half an image's value count (before that
scaling, a weight of 0.1 at 64 px was 1/2048 of the paper's). This script measures what a weight does where it
acts: the gradient norms of both terms on the UNet's own parameters, per band of the score model's noise levels,
on real batches, for a fresh UNet or a trained one. The head is freshly initialised, as when alignment starts;
a trained head lowers the alignment loss and its gradient.

    OMP_NUM_THREADS=1 python benchmarks/bench_alignment_strength.py \\
        --data ../shared/data/brain_tumor_mri/brain_tumor_mri_4class_128.npz --resolution 64 \\
        --expert /tmp/bench/fa64/brain-200/expert --unet /tmp/bench/fa64/brain-200/baseline-seed1/unet
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DModel

from medsyn.data import image_channels, image_transform
from medsyn.models.score_unet import null_class_label
from medsyn.schedulers.scheduling_annealed_langevin import geometric_sigmas
from medsyn.training.class_conditional import labelled_dataloader
from medsyn.training.dsm_loss import dsm_loss, per_value_scale, perturb
from medsyn.training.script_args import load_training_data

sys.path.insert(0, str(Path(__file__).parent))
from bench_feature_alignment import SCORE_RECIPE  # noqa: E402  (the grid's recipe, so the UNet is the same)

from medsyn.train_scripts import train_score_langevin  # noqa: E402


def flat_gradient(loss: torch.Tensor, parameters: list[torch.nn.Parameter], keep_graph: bool) -> torch.Tensor:
    """d loss / d parameters as one vector, zeros where the loss does not reach (the up path, for alignment)."""
    grads = torch.autograd.grad(loss, parameters, retain_graph=keep_graph, materialize_grads=True)
    return torch.cat([grad.flatten() for grad in grads])


def endless(dataloader):
    """The loader's batches, epoch after epoch: a small set still fills every band."""
    while True:
        yield from dataloader


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--expert", required=True, help="the alignment expert's folder")
    parser.add_argument("--unet", help="a trained score UNet's folder; default: a fresh one of the grid's recipe")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--align-weight", type=float, default=0.1)
    parser.add_argument("--bands", type=int, default=4, help="equal slices of the noise schedule, largest first")
    parser.add_argument("--batches", type=int, default=3, help="batches of 32 per band")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class BandStrength:
    """Both terms of the score script's loss in one band of noise levels, averaged over its batches."""

    sigma_max: float
    sigma_min: float
    band_weight: float  # the expert's alignment weight in the band (1 when the expert has no accuracy table)
    dsm: float
    distance: float  # weighted 1 - cosine, before --align_weight
    grad_dsm: float
    grad_align: float  # of --align_weight x per_value_scale x distance, as the score script adds it
    cosine: float  # between the two gradients


def measure(args: argparse.Namespace) -> list[BandStrength]:
    torch.manual_seed(args.seed)
    train_args = train_score_langevin.parse_args([
        *SCORE_RECIPE, "--train_data_dir", args.data, "--resolution", str(args.resolution), "--output_dir",
        "unused", "--align_expert", args.expert, "--align_weight", str(args.align_weight)])
    dataset, _ = load_training_data(train_args, require_labels=True)
    to_tensor = image_transform(args.resolution, center_crop=train_args.center_crop)
    unet, scheduler = train_score_langevin.build_model_and_scheduler(
        train_args, dataset, to_tensor, len(dataset.features["label"].names), image_channels(dataset))
    if args.unet:
        unet.load_state_dict(UNet2DModel.from_pretrained(args.unet).state_dict())
    sigmas = geometric_sigmas(scheduler.config.sigma_max, scheduler.config.sigma_min,
                              scheduler.config.num_train_timesteps).float()
    example = to_tensor(dataset[0]["image"])
    sigma_range = (scheduler.config.sigma_min, scheduler.config.sigma_max)
    aligner = train_score_langevin.build_aligner(train_args, unet, example, sigma_range, null_class_label(unet),
                                                 sigmas.device)
    parameters = [p for p in unet.parameters() if p.requires_grad]
    batches = endless(labelled_dataloader(dataset, to_tensor, train_args))

    bands = []
    for band in torch.tensor_split(sigmas, args.bands):
        rows = []
        for _ in range(args.batches):
            batch = next(batches)
            clean, labels = batch["pixel_values"], batch["labels"]
            noisy, noise, sigma = perturb(clean, band)
            score = unet(noisy, sigma, class_labels=labels).sample
            dsm = dsm_loss(score, noise, sigma).mean()
            distance = aligner.loss(noisy, sigma)
            align = args.align_weight * per_value_scale(clean) * distance
            g_dsm = flat_gradient(dsm, parameters, keep_graph=True)
            g_align = flat_gradient(align, parameters, keep_graph=False)
            rows.append((dsm.item(), distance.item(), g_dsm.norm().item(), g_align.norm().item(),
                         torch.nn.functional.cosine_similarity(g_dsm, g_align, dim=0).item()))
        mean = [sum(column) / len(column) for column in zip(*rows)]
        band_weights = aligner.weights(band)
        weight = band_weights.mean().item() if band_weights is not None else 1.0
        bands.append(BandStrength(band.max().item(), band.min().item(), weight, *mean))
    return bands


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bands = measure(args)
    print(f"{'trained' if args.unet else 'fresh'} UNet, {args.resolution} px, align weight {args.align_weight}, "
          f"{args.batches} batches of 32 per band")
    print("| sigma band | alignment weight of the band (expert) | DSM loss | align loss | grad DSM | "
          "grad weight x align | ratio | cosine of the two gradients |")
    print("|---|---|---|---|---|---|---|---|")
    for b in bands:
        print(f"| {b.sigma_max:.3g} to {b.sigma_min:.3g} | {b.band_weight:.2f} | {b.dsm:.1f} | {b.distance:.3f} | "
              f"{b.grad_dsm:.3g} | {b.grad_align:.3g} | {b.grad_align / b.grad_dsm:.2e} | {b.cosine:+.3f} |")


if __name__ == "__main__":
    main()
