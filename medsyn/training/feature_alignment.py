"""Feature-aligned diffusion (Nair 2024): align the diffusion UNet's intermediate features with a frozen expert
classifier's features of the same noisy input.

During training, the output of one UNet block (by default the end of the down path) is average-pooled; the expert
(e.g. a ResNet50 trained on the same classes) sees the noisy image the UNet sees, and a trainable linear projection
maps its pooled features to the UNet's width. The loss is the negative cosine similarity, averaged over the batch;
the training scripts add ``align_weight * loss`` to the diffusion loss. The expert is needed only in training: the
projection is saved with checkpoints, not with the pipeline.

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

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from medsyn.metrics.features import PooledImageEncoder

#: ``--align_block`` default: the last block of the UNet's down path.
DEFAULT_ALIGN_BLOCK = "down_blocks.-1"


class ExpertProjection(ModelMixin, ConfigMixin):
    """The trainable linear map from the expert's pooled features to the UNet block's channels."""

    @register_to_config
    def __init__(self, expert_dim: int, unet_dim: int):
        super().__init__()
        self.linear = nn.Linear(expert_dim, unet_dim)

    def forward(self, expert_features: torch.Tensor) -> torch.Tensor:
        return self.linear(expert_features)


class FrozenExpert(nn.Module):
    """A classifier's pooled features of images in [-1, 1], resized to the expert's input size, with no gradient
    and in eval mode for good: ``train()`` does not reach it.

    Args:
        encoder: the expert as a ``PooledImageEncoder`` (a transformers vision model with its normalisation).
        image_size: the side the expert was trained at; inputs are resized to it (bilinear).
    """

    def __init__(self, encoder: PooledImageEncoder, image_size: int | None = None):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.image_size = image_size

    @classmethod
    def from_pretrained(cls, path: str) -> FrozenExpert:
        """An expert saved by ``train_expert.py`` (or any transformers vision model); its resolution from the config."""
        encoder = PooledImageEncoder.from_pretrained(path)
        return cls(encoder, getattr(encoder.backbone.config, "image_size", None))

    def train(self, mode: bool = True) -> FrozenExpert:
        return super().train(False)

    @property
    def feature_dim(self) -> int:
        config = self.encoder.backbone.config
        sizes = getattr(config, "hidden_sizes", None)
        return sizes[-1] if sizes else config.hidden_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_size and images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images.float(), size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
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


def alignment_loss(unet_features: torch.Tensor, expert_features: torch.Tensor, projection: nn.Module) -> torch.Tensor:
    """``-cos(unet_features, projection(expert_features))`` averaged over the batch: -1 when aligned.

    Args:
        unet_features: pooled UNet features (B, C_unet); gradients flow into the UNet.
        expert_features: pooled expert features (B, C_expert), computed without gradient.
        projection: the trainable map from C_expert to C_unet.
    """
    if unet_features.shape[0] != expert_features.shape[0]:
        raise ValueError(f"{unet_features.shape[0]} UNet feature rows but {expert_features.shape[0]} expert rows")
    projected = projection(expert_features.detach())
    if projected.shape[1] != unet_features.shape[1]:
        raise ValueError(
            f"the projection gives {projected.shape[1]} channels but the unet block has {unet_features.shape[1]}"
        )
    return -F.cosine_similarity(unet_features, projected, dim=1).mean()


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
    group = parser.add_argument_group("feature alignment (Nair 2024)")
    group.add_argument("--align_expert", type=str, default=None,
                       help="An expert classifier (train_expert.py) whose features of the noisy input guide the UNet.")
    group.add_argument("--align_weight", type=float, default=0.1, help="w2 in L = L_diffusion + w2 * L_align.")
    group.add_argument("--align_block", type=str, default=DEFAULT_ALIGN_BLOCK,
                       help='The UNet block whose pooled output is aligned, e.g. "down_blocks.-1" or "mid_block".')
    group.add_argument("--align_on", type=str, default="noisy", choices=("noisy", "clean"),
                       help="What the expert sees: the noisy input (the paper's better choice) or the clean image.")


class FeatureAligner:
    """The alignment term of one training run: the frozen expert, the hook on the UNet block and the projection.

    Args:
        expert: the frozen expert classifier.
        unet: the UNet being trained (unwrapped); the hook stays on it for the whole run.
        block: the hooked block's name.
        block_dim: that block's output channels (see ``block_channels``).
    """

    def __init__(self, expert: FrozenExpert, unet: nn.Module, block: str, block_dim: int):
        self.expert = expert
        self.features = BlockFeatures(unet, block)
        self.projection = ExpertProjection(expert.feature_dim, block_dim)

    def loss(self, expert_input: torch.Tensor, projection: nn.Module | None = None) -> torch.Tensor:
        """The alignment loss for the UNet forward that just ran; ``projection`` is the (DDP-wrapped) head."""
        return alignment_loss(self.features.pop(), self.expert(expert_input), projection or self.projection)


def describe_alignment(args) -> str:
    """The alignment settings in one line, for model cards."""
    if not args.align_expert:
        return "off"
    from medsyn.model_card import card_reference

    return (f"expert {card_reference(args.align_expert)}, weight {args.align_weight}, block `{args.align_block}`, "
            f"the expert sees the {args.align_on} input")
