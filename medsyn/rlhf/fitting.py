"""In-process fitting on seeded random minibatches, for the selector's and policy's quick fits (tests, notebooks).

The training scripts use ``medsyn.training.loop`` instead (accelerate, checkpoints, resume); this is the plain loop
a few hundred steps on tensors in memory need.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def fit_on_minibatches(model: nn.Module, count: int, steps: int, batch_loss: Callable, learning_rate: float,
                       batch_size: int = 32, seed: int = 0) -> list[float]:
    """AdamW on ``model``'s trainable parameters for ``steps`` minibatches of rows drawn (with replacement) from
    ``count`` with a seeded generator, so a run repeats exactly; ``batch_loss(rows, generator)`` returns the loss
    and the value recorded for that step. Returns the recorded values; the model ends in eval mode."""
    if count == 0:
        raise ValueError("nothing to fit: no samples")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    recorded = []
    for _ in range(steps):
        rows = torch.randint(count, (min(batch_size, count),), generator=generator)
        loss, value = batch_loss(rows, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        recorded.append(float(value))
    model.eval()
    return recorded
