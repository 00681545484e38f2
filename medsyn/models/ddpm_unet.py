"""The DDPM baseline's network: the score UNet's architecture with DDPM's sinusoidal timestep embedding.

Same levels, blocks, attention and class embeddings (null class included) as ``score_unet_config``, so the two
methods are compared on equal networks; only the conditioning differs: the integer timestep t in [0, 1000) through
a positional embedding (Ho et al. 2020) instead of log(sigma) through Fourier features with the output divided by
sigma.
"""

from __future__ import annotations

from typing import Any

from medsyn.models.score_unet import score_unet_config


def ddpm_unet_config(**kwargs: Any) -> dict[str, Any]:
    """Config of a ``UNet2DModel`` for a pixel-space DDPM; arguments as ``score_unet_config``."""
    return {**score_unet_config(**kwargs), "time_embedding_type": "positional", "flip_sin_to_cos": True,
            "freq_shift": 0}
