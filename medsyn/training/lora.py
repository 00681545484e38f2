"""LoRA adapters (peft) on a pixel unet (``UNet2DModel``), which has no ``add_adapter`` of its own, and the merge
that turns an adapted unet back into a plain one that any diffusers pipeline saves and loads."""

from __future__ import annotations

import torch

#: The unet's attention projections and its residual blocks' convolutions (a small score unet has few attention
#: layers, so the convolutions carry most of the adaptable weight).
UNET2D_LORA_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def with_lora(unet: torch.nn.Module, rank: int, alpha: float | None = None,
              target_modules: list[str] | None = None, seed: int = 0) -> torch.nn.Module:
    """``unet`` frozen, with trainable LoRA adapters of ``rank`` (peft); the adapters start at zero, so the adapted
    unet computes what ``unet`` did. ``disable_adapter()`` on the result gives the unet without them. Their random
    half is drawn from ``seed`` (not the global generator), so a resumed run adapts the same way."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                        target_modules=target_modules or UNET2D_LORA_MODULES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(unet, config)


def merged(unet: torch.nn.Module) -> torch.nn.Module:
    """The plain unet with any LoRA adapters folded into its weights (``unet`` itself when it has none)."""
    if hasattr(unet, "merge_and_unload"):
        return unet.merge_and_unload()
    return unet
