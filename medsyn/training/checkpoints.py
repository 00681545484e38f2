"""Crash-safe checkpoints and step-seeded randomness shared by medsyn's training scripts.

A checkpoint is written into a hidden staging folder, every file is flushed to disk, a marker listing the files
and their sizes is written last, and only then is the folder renamed to ``checkpoint-<step>`` (one atomic
rename). Old checkpoints are pruned only after that. A run killed at any moment therefore leaves the previous
complete checkpoint in place, and ``--resume_from_checkpoint latest`` takes the newest complete one, skipping
(with a warning naming them) half-written, unmarked or foreign folders such as ``checkpoint-old``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from medsyn.output_files import fsync_path, write_text_atomically
from medsyn.seeding import keyed_generator

CHECKPOINT_PREFIX = "checkpoint-"
STAGING_PREFIX = ".staging-checkpoint-"
COMPLETE_MARKER = "medsyn_checkpoint.json"

logger = logging.getLogger(__name__)


def checkpoint_step(path: Path) -> int | None:
    """The optimiser step of a ``checkpoint-<step>`` folder; None for any other name."""
    suffix = path.name[len(CHECKPOINT_PREFIX) :] if path.name.startswith(CHECKPOINT_PREFIX) else ""
    return int(suffix) if suffix.isdigit() else None


def incompleteness(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None if it is."""
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} (a save that did not finish, or not a medsyn checkpoint)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        return f"unreadable {COMPLETE_MARKER} ({error})"
    for name, size in files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            return f"{name} is missing or not the size it was saved with"
    return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-<step>`` folders in ``output_dir``, oldest first; any other folder whose name starts
    with ``checkpoint-`` is skipped with a warning that names it and says why."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    complete = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)):
        reason = "not checkpoint-<step>" if checkpoint_step(path) is None else incompleteness(path)
        if reason is None:
            complete.append(path)
        else:
            logger.warning("skipping %s: %s", path, reason)
    return sorted(complete, key=checkpoint_step)


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``"latest"``, the newest complete one in ``output_dir`` (None if there is
    none yet), or a named folder, which must be complete."""
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
    if checkpoint_step(path) is None:
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r}: the folder must be named "
                         f"{CHECKPOINT_PREFIX}<step>")
    reason = incompleteness(path)
    if reason is not None:
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is incomplete: {reason}")
    return path


def staging_folder(output_dir: str | Path, step: int) -> Path:
    """The hidden folder that step ``step`` is saved into before ``publish_checkpoint``."""
    return Path(output_dir) / f"{STAGING_PREFIX}{step}"


def remove_leftovers(output_dir: str | Path) -> None:
    """Delete what killed saves and prunes left behind (hidden staging folders; never a checkpoint)."""
    for leftover in Path(output_dir).glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover)


def publish_checkpoint(staging: Path, step: int) -> Path:
    """Flush every file of ``staging``, mark it complete, and rename it to ``checkpoint-<step>`` atomically."""
    files = {}
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        fsync_path(file)
        files[str(file.relative_to(staging))] = file.stat().st_size
    for folder in [p for p in staging.rglob("*") if p.is_dir()] + [staging]:
        fsync_path(folder)
    write_text_atomically(staging / COMPLETE_MARKER, json.dumps({"step": step, "files": files}, indent=1))
    final = staging.parent / f"{CHECKPOINT_PREFIX}{step}"
    if final.exists():  # an unmarked leftover of a killed save at this step (a complete one is never re-saved)
        discarded = staging.parent / f"{STAGING_PREFIX}{step}-discarded"
        os.replace(final, discarded)
        shutil.rmtree(discarded)
    os.replace(staging, final)
    fsync_path(final.parent)
    return final


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> None:
    """Keep the newest ``total_limit`` complete checkpoints; run only after the newest one is complete."""
    if total_limit is None:
        return
    checkpoints = list_checkpoints(output_dir)
    for old in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        # Rename first: a kill during rmtree then leaves a hidden folder, never a half-deleted checkpoint.
        doomed = old.with_name(f"{STAGING_PREFIX}{checkpoint_step(old)}-pruned")
        os.replace(old, doomed)
        shutil.rmtree(doomed)


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
