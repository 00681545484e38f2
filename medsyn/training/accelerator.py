"""The pieces of an accelerate training run that every medsyn script sets up the same way."""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import ModelMixin
from diffusers.training_utils import EMAModel


def build_accelerator(args: argparse.Namespace, **kwargs) -> Accelerator:
    """One ``Accelerator`` from the shared flags, logging set up, seed set and the output folder made."""
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **kwargs,
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    return accelerator


def step_budget(args: argparse.Namespace, batches_per_epoch: int) -> tuple[int, int, int]:
    """(optimiser steps per epoch, total optimiser steps, epochs) from --max_train_steps or --num_train_epochs.

    ``batches_per_epoch`` is the length of the *prepared* loader: each process's share, which accelerate may round
    down, so counting from the unsharded loader would promise steps an epoch does not have.
    """
    updates_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    return updates_per_epoch, max_train_steps, math.ceil(max_train_steps / updates_per_epoch)


def attach_ema(accelerator: Accelerator, model: ModelMixin, decay: float, name: str) -> EMAModel:
    """An EMA of ``model``'s weights on the accelerator's device, saved in and restored from every checkpoint.

    The EMA goes into ``<checkpoint>/<name>`` as safetensors (not a pickle), as in diffusers' examples.
    """
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


def ema_or_trained_model(accelerator: Accelerator, model: torch.nn.Module, ema: EMAModel | None) -> ModelMixin:
    """The trained network, a copy holding the EMA weights when EMA is on, in eval mode."""
    model = accelerator.unwrap_model(model)
    if ema is not None:
        copy = type(model).from_config(model.config).to(accelerator.device)
        ema.copy_to(copy.parameters())
        model = copy
    return model.eval()
