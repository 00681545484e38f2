"""Which of the generator's weights an RLHF update trains.

A class-conditional generator shares almost all of its weights between classes, so an update that raises one
class's reward can lower another's: the trade the RLHF measurements in RESULTS.md keep showing (issue 15). Tuning
only the class-embedding rows rules that out by construction, as prompt tuning does for text models: class c's row
is moved only by class c's chains (the rows are not weight-decayed), and the null row that guidance's unconditional
half uses stays as it was.
"""

from __future__ import annotations

import contextlib
from enum import StrEnum

import torch
from torch import nn
from torch.nn.utils import parametrize

from medsyn.rlhf.fitting import DEFAULT_WEIGHT_DECAY
from medsyn.training.lora import merged, with_lora


class TunedWeights(StrEnum):
    LORA = "lora"
    ALL = "all"
    CLASS_EMBEDDINGS = "class_embeddings"

    @property
    def weight_decay(self) -> float:
        """AdamW's decay for these weights: none for embedding rows (as is usual for embeddings), whose decay would
        also move the rows of classes absent from a minibatch; AdamW's default otherwise."""
        return 0.0 if self == TunedWeights.CLASS_EMBEDDINGS else DEFAULT_WEIGHT_DECAY


class _FixedRow(nn.Module):
    """A parametrisation that pins one row of a weight to a saved value (its gradient is then zero)."""

    def __init__(self, weight: torch.Tensor, row: int):
        super().__init__()
        keep = torch.zeros(len(weight), 1, dtype=weight.dtype, device=weight.device)
        keep[row] = 1
        self.register_buffer("keep", keep)
        self.register_buffer("pinned", weight.detach().clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * (1 - self.keep) + self.pinned * self.keep


def class_embedding_table(unet: nn.Module) -> nn.Embedding:
    """The class-embedding table of a class-conditional unet (whose last row is the null class)."""
    table = getattr(unet, "class_embedding", None)
    if not isinstance(table, nn.Embedding) or getattr(unet.config, "num_class_embeds", None) is None:
        raise ValueError(f"--tune {TunedWeights.CLASS_EMBEDDINGS} needs a unet with a class-embedding table "
                         "(num_class_embeds); this generator has none (a text-conditioned model has prompts, "
                         "not class rows)")
    return table


@contextlib.contextmanager
def tuned(chain, weights: TunedWeights, lora_rank: int = 8, seed: int = 0):
    """``chain.pipe.unet`` with only ``weights`` trainable inside the block, the chain's ``reference()`` the unet
    as it came in; on leaving, a plain frozen unet again (adapters merged, the null row's pin removed), so any
    diffusers pipeline saves and loads it.

    ``lora_rank`` and ``seed`` (which draws the adapters' random half) apply to ``TunedWeights.LORA``."""
    weights = TunedWeights(weights)
    pipe = chain.pipe
    table = None
    if weights == TunedWeights.LORA:
        pipe.unet = with_lora(pipe.unet, lora_rank, seed=seed)
    else:
        if weights == TunedWeights.CLASS_EMBEDDINGS:
            table = class_embedding_table(pipe.unet)
        chain.keep_reference()
        pipe.unet.requires_grad_(table is None)
        if table is not None:
            parametrize.register_parametrization(table, "weight", _FixedRow(table.weight, len(table.weight) - 1))
            table.parametrizations.weight.original.requires_grad_(True)
    try:
        yield pipe.unet
    finally:
        if table is not None:
            parametrize.remove_parametrizations(table, "weight", leave_parametrized=True)
        pipe.unet = merged(pipe.unet).requires_grad_(False).eval()
