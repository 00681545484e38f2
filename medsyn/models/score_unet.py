"""The noise-conditional score network: diffusers' ``UNet2DModel`` configured as NCSN++/NCSNv2 does.

No new module is needed. ``time_embedding_type="fourier"`` embeds log(sigma) with random Fourier features and
divides the output by sigma (NCSNv2 technique 3: the network learns sigma * score, whose scale is the same at
every level); ``resnet_time_scale_shift="scale_shift"`` applies that embedding as FiLM (scale and shift after the
group norm) in every residual block; ``num_class_embeds = num_classes + 1`` adds class conditioning with one
extra "null" class, the unconditional score used by classifier-free guidance. The model saves, loads and
compiles as any diffusers model.
"""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DModel


def score_unet_config(
    sample_size: int = 128,
    in_channels: int = 1,
    num_classes: int | None = 2,
    base_channels: int = 64,
    channel_mult: tuple[int, ...] = (1, 2, 4, 8),
    layers_per_block: int = 2,
    attention_levels: tuple[bool, ...] | None = None,
    norm_num_groups: int = 32,
    dropout: float = 0.0,
) -> dict[str, Any]:
    """Config of a score UNet (the reference case by default: 128x128 grayscale, healthy vs tumour).

    Args:
        sample_size: image height and width.
        in_channels: 1 for grayscale scans, 3 for RGB (fundus, histology).
        num_classes: number of real classes; ``None`` for an unconditional model. The null class used by
            classifier-free guidance is index ``num_classes``.
        base_channels: channels at full resolution; level i has ``base_channels * channel_mult[i]``.
        channel_mult: one multiplier per resolution level.
        layers_per_block: residual blocks per level.
        attention_levels: self-attention per level; default: only at the lowest resolution.
        norm_num_groups: GroupNorm groups; must divide every level's channel count.
        dropout: dropout in residual blocks.
    """
    if sample_size % 2 ** (len(channel_mult) - 1):
        raise ValueError(f"sample_size {sample_size} is not divisible by 2**{len(channel_mult) - 1} (channel_mult)")
    block_out_channels = tuple(base_channels * m for m in channel_mult)
    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(f"norm_num_groups={norm_num_groups} must divide every level's channels {block_out_channels}")
    if attention_levels is None:
        attention_levels = tuple(i == len(channel_mult) - 1 for i in range(len(channel_mult)))
    if len(attention_levels) != len(channel_mult):
        raise ValueError(f"attention_levels has {len(attention_levels)} entries for {len(channel_mult)} levels")
    return dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        time_embedding_type="fourier",
        resnet_time_scale_shift="scale_shift",
        num_class_embeds=None if num_classes is None else num_classes + 1,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)),
        attention_head_dim=8,
        norm_num_groups=norm_num_groups,
        dropout=dropout,
    )


def build_score_unet(**kwargs: Any) -> UNet2DModel:
    """A freshly initialised score UNet; arguments as ``score_unet_config``."""
    return UNet2DModel(**score_unet_config(**kwargs))


def null_class_label(unet: UNet2DModel) -> int | None:
    """Index of the null (unconditional) class of a class-conditional score UNet, ``None`` otherwise."""
    num_embeds = unet.config.num_class_embeds
    return None if num_embeds is None else num_embeds - 1
