"""Checkpoint bookkeeping and step-seeded randomness shared by medsyn's training scripts."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from medsyn.seeding import keyed_generator

CHECKPOINT_PREFIX = "checkpoint-"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-<step>`` folders in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``"latest"`` in ``output_dir`` (None if there is none yet) or a path."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r}: no such checkpoint folder")
    return path


def checkpoint_step(path: Path) -> int:
    """The optimiser step a ``checkpoint-<step>`` folder was saved at."""
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> None:
    """Delete the oldest checkpoints so that one more can be saved within ``total_limit``."""
    if total_limit is None:
        return
    checkpoints = list_checkpoints(output_dir)
    for old in checkpoints[: max(0, len(checkpoints) - total_limit + 1)]:
        shutil.rmtree(old)


def step_generator(seed: int, micro_step: int, process_index: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on (seed, micro-batch index, rank).

    Training draws its noise, label dropout and augmentation from it, so a run resumed from a checkpoint
    draws exactly what the uninterrupted run drew, whatever the data loader prefetched.
    """
    return keyed_generator(seed, micro_step, process_index, device=device)


def seed_global_rng(seed: int, micro_step: int, process_index: int) -> None:
    """Reseed torch's global generator from (seed, micro-batch index, rank).

    Layers that draw from it (dropout in a BERT text encoder) then draw the same masks in a resumed run as in an
    uninterrupted one, although the resumed run consumed the global generator differently before (building models,
    starting a new data-loader iterator).
    """
    torch.manual_seed(keyed_generator(seed, micro_step, process_index, 1).initial_seed())
