"""In-process fitting on seeded random minibatches: the generator updates of an RLHF round, and the selector's and
policy's quick fits in tests and notebooks.

The training scripts use ``medsyn.training.loop`` instead (accelerate, checkpoints, resume); this is the plain loop
a few hundred steps on tensors in memory need. Under several processes (``accelerator``) every process draws the
same minibatch, works on its share of the rows, and the gradients are summed across processes weighted by share,
so each optimiser step sees the whole minibatch's mean gradient, as one process would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from torch import nn

#: AdamW's own default decay, for the weights that take one.
DEFAULT_WEIGHT_DECAY = 1e-2


def fit_on_minibatches(model: nn.Module, count: int, steps: int, batch_loss: Callable, learning_rate: float,
                       batch_size: int = 32, seed: int = 0, max_grad_norm: float | None = None,
                       accelerator: Accelerator | None = None, weight_decay: float = DEFAULT_WEIGHT_DECAY) -> list:
    """AdamW (with ``weight_decay``) on ``model``'s trainable parameters for ``steps`` minibatches of rows drawn (with
    replacement) from ``count`` with a seeded generator, so a run repeats exactly; ``batch_loss(rows, generator)``
    returns the loss and the value recorded for that step. A loss of None means ``batch_loss`` back-propagated
    itself (a graph too large for one pass, such as a sampling chain's). Gradients are clipped to ``max_grad_norm``
    when given. Returns the recorded values; the model ends in eval mode.

    With ``accelerator`` of several processes, ``batch_loss`` gets this process's rows of the minibatch and a
    generator of its own (seeded from the shared one); the model must start identical on every process, and stays
    so. Values are recorded as this process computed them."""
    if count == 0:
        raise ValueError("nothing to fit: no samples")
    world = 1 if accelerator is None else accelerator.num_processes
    if min(batch_size, count) < world:
        raise ValueError(f"a minibatch of {min(batch_size, count)} cannot be shared by {world} processes")
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    model.train()
    recorded = []
    for _ in range(steps):
        rows = torch.randint(count, (min(batch_size, count),), generator=generator)
        optimizer.zero_grad()
        if world == 1:
            loss, value = batch_loss(rows, generator)
        else:
            own = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator))
                                                + accelerator.process_index)
            share = rows[accelerator.process_index :: world]
            loss, value = batch_loss(share, own)
        if loss is not None:
            loss.backward()
        if world > 1:
            sum_gradients(parameters, len(share) / len(rows), accelerator)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        recorded.append(value)
    model.eval()
    return recorded


def sum_gradients(parameters: list[nn.Parameter], share: float, accelerator: Accelerator) -> None:
    """Every process's gradients times its ``share`` of the minibatch, summed across processes in place: the
    gradient of the whole minibatch's mean loss. A parameter no process computed a gradient for keeps none, so the
    optimiser leaves it alone (weight decay included), as it would in one process."""
    given = torch.tensor([float(p.grad is not None) for p in parameters], device=parameters[0].device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in parameters])
    flat, given = accelerator.reduce(flat * share, reduction="sum"), accelerator.reduce(given, reduction="sum")
    start = 0
    for p, somewhere in zip(parameters, given.tolist()):
        p.grad = flat[start : start + p.numel()].view_as(p).clone() if somewhere else None
        start += p.numel()
