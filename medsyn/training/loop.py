"""The one optimisation loop every medsyn training script runs, with the method's loss as a callable.

As NVlabs/edm's ``training_loop(loss_fn=...)``: a script builds its models, data and optimiser, wraps the prepared
pieces in a ``TrainingRun`` and hands the loop its ``loss_fn``. The loop owns what every method shares and what
must not drift between copies: resuming mid-epoch, a per-step seeded generator (``step_generator``), gradient
accumulation and clipping, the non-finite loss guard, the EMA update, logging, crash-safe checkpoints, validation
on schedule and the stop at ``max_train_steps``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from medsyn.output_files import write_text_atomically
from medsyn.training.accelerator import resume_position, save_checkpoint, trained_module, validation_due
from medsyn.training.checkpoints import step_generator
from medsyn.training.differential_privacy import PrivacyReport, PrivateTraining

logger = logging.getLogger(__name__)

#: How many recent optimiser steps ``TrainingResult.recent`` keeps per logged value (the model card's final loss).
RECENT_STEPS = 50


@dataclass
class TrainingStep:
    """Where the loop is when it calls ``loss_fn``: its generator is the only randomness a loss may draw, keyed by
    (seed, micro-batch, process) so that a resumed run draws what an uninterrupted one would."""

    generator: torch.Generator
    micro_step: int
    global_step: int


#: ``loss_fn(batch, step)`` returns named scalars; ``"loss"`` is the objective the loop back-propagates, the rest
#: (tensors or floats) are only logged.
LossFn = Callable[[dict, TrainingStep], dict[str, torch.Tensor | float]]


@dataclass
class TrainingRun:
    """The prepared pieces the loop drives.

    ``models`` are the trained modules as ``accelerator.prepare`` returned them: the loop accumulates gradients
    over them and puts them in train mode; the EMA (if any) follows the first one. ``parameters`` are clipped to
    ``--max_grad_norm``.
    """

    accelerator: Accelerator
    models: Sequence[torch.nn.Module]
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: torch.utils.data.DataLoader
    updates_per_epoch: int
    max_train_steps: int
    ema: EMAModel | None = None
    privacy: PrivateTraining | None = None
    """DP-SGD (``medsyn.training.differential_privacy``): its backward replaces the loop's, its optimiser clips and
    noises per sample (``--max_grad_norm`` is not applied), and a batch may be empty."""


@dataclass
class TrainingResult:
    """The step reached and the last ``RECENT_STEPS`` values of everything ``loss_fn`` returned."""

    global_step: int
    recent: dict[str, list[float]] = field(default_factory=dict)
    privacy: PrivacyReport | None = None

    def mean(self, name: str = "loss", digits: int = 4) -> str:
        """The recent mean of ``name`` for a model card, or "n/a" when no step ran."""
        values = self.recent.get(name)
        return f"{np.mean(values):.{digits}f}" if values else "n/a"


def training_loop(
    args: argparse.Namespace,
    run: TrainingRun,
    loss_fn: LossFn,
    *,
    tracker_project_name: str,
    after_update: Callable[[dict, dict], dict] | None = None,
    validate: Callable[[int], None] | None = None,
) -> TrainingResult:
    """Train until ``run.max_train_steps`` optimiser steps, resuming first when ``--resume_from_checkpoint`` says so.

    Args:
        args: the script's flags (seed, accumulation, clipping, checkpoint and validation schedule, resume).
        run: the prepared models, optimiser, scheduler and loader.
        loss_fn: the method: ``loss_fn(batch, step) -> {"loss": objective, other named terms}``.
        tracker_project_name: the trackers' project, unless ``--tracker_project_name`` names another.
        after_update: a second update inside the same accumulation step, after the main optimiser's (a GAN's
            discriminator): ``after_update(batch, losses) -> more named terms to log``.
        validate: called on the main process when ``--validation_steps``/``--validation_epochs`` say so, with
            the optimiser step; the models are put back in train mode after it.
    """
    accelerator = run.accelerator
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name or tracker_project_name,
                                  config={k: str(v) for k, v in vars(args).items()})
    global_step, first_epoch, resume_batches = resume_position(args, accelerator, run.updates_per_epoch)
    result = TrainingResult(global_step)
    num_epochs = math.ceil(run.max_train_steps / run.updates_per_epoch)
    progress = tqdm(range(run.max_train_steps), initial=global_step, disable=not accelerator.is_local_main_process)
    micro_step = global_step * args.gradient_accumulation_steps
    for epoch in range(first_epoch, num_epochs):
        if global_step >= run.max_train_steps:
            break
        train_mode(run.models)
        run.dataloader.set_epoch(epoch)
        batches = (accelerator.skip_first_batches(run.dataloader, resume_batches) if epoch == first_epoch
                   else run.dataloader)
        for batch in batches:
            step = TrainingStep(
                step_generator(args.seed, micro_step, accelerator.process_index, accelerator.device),
                micro_step, global_step,
            )
            micro_step += 1
            with accelerator.accumulate(*run.models):
                if run.privacy is None:
                    losses = finite(loss_fn(batch, step), global_step)
                    accelerator.backward(losses["loss"])
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(run.parameters, args.max_grad_norm)
                else:
                    losses = finite(run.privacy.backward(loss_fn, batch, step), global_step)
                run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad()
                if after_update is not None:
                    losses = {**losses, **after_update(batch, losses)}

            if not accelerator.sync_gradients:
                continue
            if run.ema is not None:
                run.ema.step(trained_module(accelerator, run.models[0]).parameters())
            global_step += 1
            result.global_step = global_step
            progress.update(1)
            logs = {name: gathered_mean(accelerator, value) for name, value in losses.items()}
            for name, value in logs.items():
                result.recent[name] = (result.recent.get(name, []) + [value])[-RECENT_STEPS:]
            accelerator.log({**logs, "lr": run.lr_scheduler.get_last_lr()[0]}, step=global_step)
            if logs:  # an empty DP batch has no loss
                progress.set_postfix(loss=f"{logs['loss']:.4g}")
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(args, accelerator, global_step)
            if validate is not None and accelerator.is_main_process and validation_due(
                args, global_step, run.max_train_steps, run.updates_per_epoch
            ):
                validate(global_step)
                train_mode(run.models)
            if global_step >= run.max_train_steps:
                break
    progress.close()
    if run.privacy is not None:
        run.privacy.detach()
        result.privacy = run.privacy.report()
    accelerator.wait_for_everyone()
    return result


def finite(losses: dict, global_step: int) -> dict:
    """``losses`` as they are, or a clear error before a non-finite loss reaches the weights."""
    if losses and not torch.isfinite(losses["loss"]):
        raise FloatingPointError(f"loss is {losses['loss'].item()} at step {global_step}; lower --learning_rate")
    return losses


def run_card_fields(args: argparse.Namespace, accelerator: Accelerator, result: TrainingResult) -> dict[str, object]:
    """What every model card says about the run: its name, licence, data and base, and how it was optimised."""
    return dict(
        model_name=Path(args.output_dir).name,
        hub_model_id=args.hub_model_id,
        license=args.license,
        dataset=args.dataset_name,
        base_model=args.pretrained_model_name_or_path,
        train_steps=result.global_step,
        batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_processes=f"{accelerator.num_processes} process" + ("es" if accelerator.num_processes != 1 else ""),
        learning_rate=args.learning_rate,
        mixed_precision=accelerator.mixed_precision,
        ema=f"decay {args.ema_decay}" if getattr(args, "use_ema", False) else "off",
        final_loss="withheld: a DP run publishes nothing about its data outside the guarantee" if result.privacy
        else result.mean(),
        differential_privacy=result.privacy.card_text() if result.privacy else
        "off: no formal guarantee (`--dp_epsilon` trains with one)",
    )


def public_image_count(num_images: int, result: TrainingResult) -> int | str:
    """The number of training images, or for a DP run a note that it is withheld (outside the guarantee)."""
    return "withheld (differentially private run)" if result.privacy else num_images


def write_training_summary(output_dir: str | Path, card_fields: dict[str, object], result: TrainingResult) -> Path:
    """``training_summary.json``: the card's facts about the run as data, with DP-SGD's accounting when it ran."""
    summary = {**card_fields, "differential_privacy": asdict(result.privacy) if result.privacy else None}
    path = Path(output_dir) / "training_summary.json"
    write_text_atomically(path, json.dumps(summary, indent=2, default=str))
    return path


def train_mode(models: Sequence[torch.nn.Module]) -> None:
    for model in models:
        model.train()


def gathered_mean(accelerator: Accelerator, value: torch.Tensor | float) -> float:
    """A logged scalar averaged over processes (floats are the same on every process and logged as they are)."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    return accelerator.gather(value.detach().float().reshape(1)).mean().item()
