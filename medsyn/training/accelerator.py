"""The pieces of an accelerate training run that every medsyn script sets up the same way."""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    set_seed,
)
from diffusers import ModelMixin
from diffusers.training_utils import EMAModel

from medsyn.training.checkpoints import (
    checkpoint_step,
    prune_checkpoints,
    publish_checkpoint,
    remove_leftovers,
    resolve_checkpoint,
    staging_folder,
)


def build_optimizer(args: argparse.Namespace, parameters, learning_rate: float | None = None,
                    weight_decay: float | None = None) -> torch.optim.Optimizer:
    """AdamW with the script's flags, or bitsandbytes' 8-bit AdamW with ``--use_8bit_adam`` (as diffusers)."""
    optimizer_class = torch.optim.AdamW
    if args.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as error:
            raise ValueError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        optimizer_class = bitsandbytes.optim.AdamW8bit
    return optimizer_class(
        parameters, lr=args.learning_rate if learning_rate is None else learning_rate,
        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        weight_decay=args.adam_weight_decay if weight_decay is None else weight_decay,
    )


def enable_gradient_checkpointing(args: argparse.Namespace, *models: torch.nn.Module) -> None:
    """``--gradient_checkpointing`` on diffusers models and transformers models alike."""
    if not args.gradient_checkpointing:
        return
    for model in models:
        if hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing()
        else:
            model.gradient_checkpointing_enable()


def build_accelerator(args: argparse.Namespace, find_unused_parameters: bool = False) -> Accelerator:
    """One ``Accelerator`` from the shared flags, logging set up, seed set and the output folder made.

    ``find_unused_parameters``: for a model whose forward leaves some weights out (a pretrained encoder's pooler head),
    which DDP otherwise refuses.

    ``--scale_lr`` rescales ``args.learning_rate`` in place (by batch size x accumulation x processes), as
    diffusers' examples do, so everything after (optimiser, model card) sees the rate actually used.
    """
    output_dir = Path(args.output_dir)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters
        else None,
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if accelerator.is_main_process:
        logging.getLogger(__name__).info(precision_note(accelerator.mixed_precision, accelerator.num_processes))
    set_seed(args.seed)
    if args.scale_lr:
        args.learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    return accelerator


def precision_note(mixed_precision: str, num_processes: int) -> str:
    """What the run trains in. ``accelerate launch`` without ``--mixed_precision`` warns that it set 'no'; the
    script's own ``--mixed_precision`` still wins, and this line says so, so a bf16 run is not read as fp32."""
    processes = f"{num_processes} process{'es' if num_processes > 1 else ''}"
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher and launcher != mixed_precision:
        return (f"{processes}, mixed precision {mixed_precision} (this script's --mixed_precision; accelerate "
                f"launch's '{launcher}', and any warning about it, does not apply)")
    return f"{processes}, mixed precision {mixed_precision}"


def end_training(accelerator: Accelerator, keep_process_group: bool = False) -> None:
    """``accelerator.end_training()``, or, for a script run inside its caller's processes (train_rlhf.py trains the
    selector and policy through their scripts), only its trackers finished: ``end_training`` also destroys the process
    group, which the caller still needs."""
    if not keep_process_group:
        accelerator.end_training()
        return
    for tracker in accelerator.trackers:
        tracker.finish()


def step_budget(args: argparse.Namespace, batches_per_epoch: int) -> tuple[int, int, int]:
    """(optimiser steps per epoch, total optimiser steps, epochs) from --max_train_steps or --num_train_epochs.

    ``batches_per_epoch`` is the length of the *prepared* loader: each process's share, which accelerate may round
    down, so counting from the unsharded loader would promise steps an epoch does not have.
    """
    updates_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    return updates_per_epoch, max_train_steps, math.ceil(max_train_steps / updates_per_epoch)


def attach_ema(accelerator: Accelerator, model: torch.nn.Module, decay: float, name: str) -> EMAModel:
    """An EMA of the weights of ``model`` (as prepared: wrappers are looked through) on the accelerator's device,
    saved in and restored from every checkpoint.

    The EMA goes into ``<checkpoint>/<name>`` as safetensors (not a pickle), as in diffusers' examples.
    """
    model = trained_module(accelerator, model)
    model_cls = type(model)
    ema = EMAModel(model.parameters(), decay=decay, model_cls=model_cls, model_config=model.config)
    ema.to(accelerator.device)

    def save_ema(models, weights, checkpoint_dir):
        if accelerator.is_main_process:
            ema.save_pretrained(os.path.join(checkpoint_dir, name))

    def load_ema(models, checkpoint_dir):
        ema.load_state_dict(EMAModel.from_pretrained(os.path.join(checkpoint_dir, name), model_cls).state_dict())
        ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_ema)
    accelerator.register_load_state_pre_hook(load_ema)
    return ema


def trained_module(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The network itself, out of accelerate's wrappers (DDP, compile) and Opacus' per-sample-gradient wrapper."""
    from opacus import GradSampleModule

    model = accelerator.unwrap_model(model)
    return model._module if isinstance(model, GradSampleModule) else model


def ema_or_trained_model(accelerator: Accelerator, model: torch.nn.Module, ema: EMAModel | None) -> ModelMixin:
    """The trained network, a copy holding the EMA weights when EMA is on, in eval mode."""
    model = trained_module(accelerator, model)
    if ema is not None:
        copy = type(model).from_config(model.config).to(accelerator.device)
        ema.copy_to(copy.parameters())
        model = copy
    return model.eval()


def validation_due(args: argparse.Namespace, global_step: int, max_train_steps: int, updates_per_epoch: int) -> bool:
    """Every ``--validation_steps`` steps, and at the end of every ``--validation_epochs``-th epoch; not at the last
    step, where the final model gets its own images."""
    if global_step >= max_train_steps:
        return False
    epochs_done, into_epoch = divmod(global_step, updates_per_epoch)
    at_epoch_end = bool(args.validation_epochs) and into_epoch == 0 and epochs_done % args.validation_epochs == 0
    return global_step % args.validation_steps == 0 or at_epoch_end


def build_lr_scheduler(args: argparse.Namespace, accelerator: Accelerator, optimizer, max_train_steps: int):
    """diffusers' ``get_scheduler`` from --lr_scheduler/--lr_warmup_steps, prepared (it steps once per process).

    "constant" with warm-up steps is "constant_with_warmup": diffusers' "constant" ignores the warm-up silently."""
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if args.lr_scheduler == "constant" and args.lr_warmup_steps else args.lr_scheduler
    return accelerator.prepare(get_scheduler(
        name, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=(getattr(args, "lr_schedule_steps", None) or max_train_steps) * accelerator.num_processes,
    ))


def resume_position(args: argparse.Namespace, accelerator: Accelerator, updates_per_epoch: int) -> tuple[int, int, int]:
    """Load the checkpoint --resume_from_checkpoint names, if any; return (optimiser step, first epoch, batches of
    that epoch to skip), all 0 for a fresh start."""
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is None:
        return 0, 0, 0
    accelerator.print(f"Resuming from {checkpoint}")
    accelerator.load_state(str(checkpoint))
    step = checkpoint_step(checkpoint)
    return step, step // updates_per_epoch, (step % updates_per_epoch) * args.gradient_accumulation_steps


def save_checkpoint(args: argparse.Namespace, accelerator: Accelerator, global_step: int) -> None:
    """``checkpoint-<step>`` in the output folder, crash-safe (``medsyn.training.checkpoints``), then older ones
    pruned to --checkpoints_total_limit. Every rank calls it: each saves its own random states."""
    if accelerator.is_main_process:
        remove_leftovers(args.output_dir)
    accelerator.wait_for_everyone()
    staging = staging_folder(args.output_dir, global_step)
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_checkpoint(staging, global_step)
        prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
    accelerator.wait_for_everyone()
