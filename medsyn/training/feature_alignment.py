"""Feature-aligned diffusion (Nair 2024) with a fixed target (REPA, Yu et al. 2024): the diffusion UNet's intermediate
features must predict a frozen expert classifier's features of the same noisy input.

During training, the output of one UNet block (by default the end of the down path) is average-pooled and a small
trainable MLP (the head) maps it into the expert's feature space; the loss is ``1 - cos`` to the expert's pooled
features, weighted per image by how informative the expert is at that image's noise level (``expert_noise``). The
training scripts add ``align_weight * loss`` to the diffusion loss. Head and expert are needed only in training: the
head is saved with checkpoints, not with the pipeline.

Why this direction: in the paper (and its code) a trainable projection maps the *expert's* features to the UNet's
width, so both sides of the cosine move and a projection whose bias dominates makes the target constant: the UNet
can lower the loss without learning anything from the expert. Here the target has no trainable parameters, so a UNet
whose features ignore the input cannot get the loss below ``1 - |mean of the expert's unit feature vectors|``.

Unlike the paper's public code, the expert stays in eval mode whatever ``train()`` calls reach it (BatchNorm
statistics must not drift), none of its parameters reach the optimiser, and batch size 1 works.

In the latent model (MediSyn) the UNet sees a noisy *latent*, which the pixel-space expert cannot read. The expert
is given the pixel image noised to the same timestep with the same schedule (``add_noise(x0, eps, t)``, fresh
pixel noise), rather than the decoded noisy latent: the decoder never saw noisy latents, so at high noise it returns
its own artefacts rather than "the noisy image", and a decoder pass per step would cost more than the UNet at
small latents. The expert thus sees what it would in pixel-space diffusion, at the signal-to-noise ratio the UNet
works at.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from medsyn.metrics.features import PooledImageEncoder
from medsyn.training.expert_noise import ExpertNoise, NoiseAccuracy

logger = logging.getLogger(__name__)

#: The expert config's entry for its noise process and accuracy per noise level (``train_expert.py --noise_augment``).
EXPERT_NOISE_KEY = "medsyn_noise_augment"

#: ``--align_block`` default: the last block of the UNet's down path.
DEFAULT_ALIGN_BLOCK = "down_blocks.-1"


class AlignmentHead(ModelMixin, ConfigMixin):
    """REPA's projector: an MLP (two hidden layers, SiLU) from the UNet block's pooled features to the expert's."""

    @register_to_config
    def __init__(self, unet_dim: int, expert_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or expert_dim
        self.mlp = nn.Sequential(nn.Linear(unet_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.SiLU(), nn.Linear(hidden_dim, expert_dim))

    def forward(self, unet_features: torch.Tensor) -> torch.Tensor:
        return self.mlp(unet_features)


class FrozenExpert(nn.Module):
    """A classifier's pooled features of images in [-1, 1], resized to the expert's input size, with no gradient
    and in eval mode for good: ``train()`` does not reach it.

    Args:
        encoder: the expert as a ``PooledImageEncoder`` (a transformers vision model with its normalisation).
        image_size: the side the expert was trained at; inputs are resized to it (bilinear).
        noise: the noise process a noise-aware expert was trained on (None: clean images only).
        accuracy: its held-out accuracy per noise level (None: not measured).
    """

    def __init__(self, encoder: PooledImageEncoder, image_size: int | None = None, noise: ExpertNoise | None = None,
                 accuracy: NoiseAccuracy | None = None):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.encoder.image_size = image_size
        self.noise = noise
        self.accuracy = accuracy

    @classmethod
    def from_pretrained(cls, path: str) -> FrozenExpert:
        """An expert saved by ``train_expert.py`` (or any transformers vision model): its resolution, noise process
        and accuracy per noise level come from its config."""
        encoder = PooledImageEncoder.from_pretrained(path)
        config = encoder.backbone.config
        saved = getattr(config, EXPERT_NOISE_KEY, None)
        noise = ExpertNoise.from_dict(saved["process"]) if saved else None
        accuracy = NoiseAccuracy(**saved["accuracy"]) if saved else None
        return cls(encoder, encoder.image_size, noise, accuracy)

    def train(self, mode: bool = True) -> FrozenExpert:
        return super().train(False)

    @property
    def image_size(self) -> int | None:
        return self.encoder.image_size

    @property
    def feature_dim(self) -> int:
        config = self.encoder.backbone.config
        sizes = getattr(config, "hidden_sizes", None)
        return sizes[-1] if sizes else config.hidden_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """Features of images in [-1, 1]; a noise-aware expert scales images corrupted at levels ``sigma`` (B,) as
        it was trained to see them."""
        if self.noise is not None and sigma is not None:
            images = self.noise.expert_view(images, sigma)
        return self.encoder(images.float() / 2 + 0.5)


def resolve_block(unet: nn.Module, name: str) -> nn.Module:
    """The UNet submodule ``name`` names: a dotted path in which list indices may be negative ("down_blocks.-1")."""
    module = unet
    for part in name.split("."):
        try:
            module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
        except (AttributeError, IndexError, TypeError) as error:
            raise ValueError(f"--align_block {name!r}: the unet has no {part!r} there ({error})") from None
    return module


class BlockFeatures:
    """Records the average-pooled output of one UNet block on every forward (a forward hook).

    Down blocks return ``(hidden_states, residuals)``; the hidden states are what is pooled.
    """

    def __init__(self, unet: nn.Module, block: str = DEFAULT_ALIGN_BLOCK):
        self.block = block
        self.pooled: torch.Tensor | None = None
        self._handle = resolve_block(unet, block).register_forward_hook(self._record)

    def _record(self, module, inputs, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self.pooled = hidden.float().mean(dim=(2, 3))

    def pop(self) -> torch.Tensor:
        """The features of the latest forward, cleared so that a stale one is never used twice."""
        if self.pooled is None:
            raise RuntimeError(f"the unet block {self.block!r} has not run since the last alignment loss")
        pooled, self.pooled = self.pooled, None
        return pooled

    def remove(self) -> None:
        self._handle.remove()


def alignment_loss(unet_features: torch.Tensor, expert_features: torch.Tensor, head: nn.Module,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - cos(head(unet_features), expert_features)``, averaged over the batch with per-image ``weights``: 0 when
    aligned, and weight-0 images add nothing.

    Args:
        unet_features: pooled UNet features (B, C_unet); gradients flow into the UNet and the head.
        expert_features: pooled expert features (B, C_expert), a fixed target.
        head: the trainable map from C_unet to C_expert.
        weights: (B,) per-image weights; None for all ones.
    """
    if unet_features.shape[0] != expert_features.shape[0]:
        raise ValueError(f"{unet_features.shape[0]} UNet feature rows but {expert_features.shape[0]} expert rows")
    predicted = head(unet_features)
    if predicted.shape[1] != expert_features.shape[1]:
        raise ValueError(
            f"the head gives {predicted.shape[1]} features but the expert has {expert_features.shape[1]}"
        )
    distance = 1 - F.cosine_similarity(predicted, expert_features.detach().to(predicted.dtype), dim=1)
    return distance.mean() if weights is None else (weights.to(distance) * distance).mean()


def block_channels(unet: nn.Module, block: str, sample: torch.Tensor, **forward_kwargs) -> int:
    """Channels of ``block``'s output, found by one forward pass of ``sample`` (no gradient)."""
    probe = BlockFeatures(unet, block)
    try:
        with torch.no_grad():
            unet(sample, **forward_kwargs)
        return probe.pop().shape[1]
    finally:
        probe.remove()


def add_alignment_arguments(parser) -> None:
    """The ``--align_*`` flags, the same in every diffusion training script."""
    group = parser.add_argument_group("feature alignment (Nair 2024, with REPA's fixed target)")
    group.add_argument("--align_expert", type=str, default=None,
                       help="An expert classifier (train_expert.py, best with --noise_augment) whose features of the "
                            "noisy input the UNet's features must predict.")
    group.add_argument("--align_weight", type=float, default=0.1,
                       help="w2 in L = L_diffusion + w2 * L_align, against L_diffusion as a per-value mean squared "
                            "error (diffusers' and MediSyn's; the score model's per-image DSM sum is half an image's "
                            "value count times that), so that a weight means the same at every resolution and in "
                            "every training script.")
    group.add_argument("--align_block", type=str, default=DEFAULT_ALIGN_BLOCK,
                       help='The UNet block whose pooled output is aligned, e.g. "down_blocks.-1" or "mid_block".')
    group.add_argument("--align_on", type=str, default="noisy", choices=("noisy", "clean"),
                       help="What the expert sees: the noisy input (the paper's better choice) or the clean image.")
    group.add_argument("--align_min_margin", type=float, default=0.1,
                       help="A noise-aware expert is aligned to only where its accuracy beats chance by this much; "
                            "above it the loss is weighted by the accuracy over chance.")
    group.add_argument("--align_head_dim", type=int, default=None,
                       help="Hidden width of the MLP head; default: the expert's feature width.")


class FeatureAligner:
    """The alignment term of one training run: the frozen expert, the hook on the UNet block and the MLP head.

    Args:
        expert: the frozen expert classifier.
        unet: the UNet being trained (unwrapped); the hook stays on it for the whole run.
        block: the hooked block's name.
        block_dim: that block's output channels (see ``block_channels``).
        model_noise: the diffusion model's noise process; a noise-aware expert must have been trained on it.
        resolution: the side of the images the expert is shown.
        min_margin: accuracy over chance below which a noise level gets weight 0.
        head_dim: the head's hidden width (default: the expert's feature width).
    """

    def __init__(self, expert: FrozenExpert, unet: nn.Module, block: str, block_dim: int, model_noise: ExpertNoise,
                 resolution: int, min_margin: float = 0.1, head_dim: int | None = None):
        if expert.noise is not None:
            expert.noise.check_serves(model_noise)
            if expert.image_size not in (None, resolution):
                logger.warning(f"the noise-aware expert was trained at {expert.image_size} px but sees {resolution} "
                               f"px images: resizing changes the noise it learned; train it at {resolution} px")
        else:
            logger.warning("the alignment expert was trained on clean images only: its features of strongly noised "
                           "inputs are noise; train it with --noise_augment to align where it is informative")
        self.expert = expert
        self.model_noise = model_noise
        self.min_margin = min_margin
        self.features = BlockFeatures(unet, block)
        self.head = AlignmentHead(block_dim, expert.feature_dim, head_dim)

    def weights(self, sigma: torch.Tensor) -> torch.Tensor | None:
        """Per-image weights at the VE-equivalent levels ``sigma`` (None: every image counts fully)."""
        if self.expert.accuracy is None:
            return None
        return self.expert.accuracy.weights(sigma, self.min_margin)

    def loss(self, expert_input: torch.Tensor, sigma: torch.Tensor | None,
             head: nn.Module | None = None) -> torch.Tensor:
        """The alignment loss for the UNet forward that just ran.

        Args:
            expert_input: what the expert sees, in [-1, 1] plus the model's noise.
            sigma: the VE-equivalent noise level of each image (B,); None when the expert sees clean images.
            head: the (DDP-wrapped) head; default: the unwrapped one.
        """
        weights = None if sigma is None else self.weights(sigma)
        return alignment_loss(self.features.pop(), self.expert(expert_input, sigma), head or self.head, weights)


def describe_alignment(args, aligner: FeatureAligner | None) -> str:
    """The alignment settings in one line, for model cards."""
    if aligner is None:
        return "off"
    from medsyn.model_card import card_reference

    accuracy = aligner.expert.accuracy
    if args.align_on == "clean" or accuracy is None:
        weighting = "every noise level weighted equally"
        if accuracy is None:
            weighting += " (the expert has no accuracy per noise level)"
    else:
        kept = accuracy.informative_range(args.align_min_margin)
        weighting = (f"noise levels weighted by the expert's accuracy over chance (margin {args.align_min_margin}; "
                     + (f"informative for sigma {kept[0]:.3g} to {kept[1]:.3g})" if kept else "no level informative)"))
    return (f"expert {card_reference(args.align_expert)}, weight {args.align_weight} per value, "
            f"block `{args.align_block}`, the expert sees the {args.align_on} input, an MLP head predicts its "
            f"features (1 - cosine), {weighting}")
