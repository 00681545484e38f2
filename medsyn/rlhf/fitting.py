"""In-process fitting on seeded random minibatches, for the selector's and policy's quick fits (tests, notebooks).

The training scripts use ``medsyn.training.loop`` instead (accelerate, checkpoints, resume); this is the plain loop
a few hundred steps on tensors in memory need.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def fit_on_minibatches(model: nn.Module, count: int, steps: int, batch_loss: Callable, learning_rate: float,
                       batch_size: int = 32, seed: int = 0, max_grad_norm: float | None = None) -> list:
    """AdamW on ``model``'s trainable parameters for ``steps`` minibatches of rows drawn (with replacement) from
    ``count`` with a seeded generator, so a run repeats exactly; ``batch_loss(rows, generator)`` returns the loss
    and the value recorded for that step. A loss of None means ``batch_loss`` back-propagated itself (a graph too
    large for one pass, such as a sampling chain's). Gradients are clipped to ``max_grad_norm`` when given.
    Returns the recorded values; the model ends in eval mode."""
    if count == 0:
        raise ValueError("nothing to fit: no samples")
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
    model.train()
    recorded = []
    for _ in range(steps):
        rows = torch.randint(count, (min(batch_size, count),), generator=generator)
        optimizer.zero_grad()
        loss, value = batch_loss(rows, generator)
        if loss is not None:
            loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        recorded.append(value)
    model.eval()
    return recorded
