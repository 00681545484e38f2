"""The helpers every training script shares: step budget, global reseeding, diffusers' flags."""

from __future__ import annotations

import argparse

import pytest
import torch

from medsyn.training.accelerator import precision_note, step_budget
from medsyn.training.checkpoints import seed_global_rng


def test_step_budget_counts_optimiser_steps_from_the_prepared_loader():
    args = argparse.Namespace(gradient_accumulation_steps=2, max_train_steps=None, num_train_epochs=3)
    assert step_budget(args, 7) == (4, 12, 3)  # 7 batches, 2 per update: the last update takes one batch
    args.max_train_steps = 10
    assert step_budget(args, 7) == (4, 10, 3)


def test_the_run_says_it_trains_in_the_scripts_precision_over_the_launchers(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what accelerate launch sets when not told
    note = precision_note("bf16", 1)
    assert note.startswith("1 process, mixed precision bf16") and "'no'" in note and "does not apply" in note
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert precision_note("bf16", 2) == "2 processes, mixed precision bf16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert precision_note("no", 1) == "1 process, mixed precision no"


def test_scale_lr_tf32_and_tracker_name_do_what_they_do_in_diffusers(tmp_path):
    from medsyn.train_scripts.train_score_langevin import main, parse_args

    from .test_train_score_langevin import TINY

    args = parse_args(TINY + ["--output_dir", str(tmp_path / "run"), "--max_train_steps", "1", "--scale_lr",
                              "--learning_rate", "1e-4", "--gradient_accumulation_steps", "2", "--allow_tf32",
                              "--checkpointing_steps", "100", "--validation_steps", "100", "--report_to",
                              "tensorboard", "--tracker_project_name", "brain-mri-runs"])
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        main(args)
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert args.learning_rate == pytest.approx(1e-4 * 4 * 2)  # batch 4 x accumulation 2 x 1 process
    assert (tmp_path / "run" / "logs" / "brain-mri-runs").is_dir()


def test_global_reseeding_depends_only_on_the_key():
    seed_global_rng(1, 5, 0)
    first = torch.rand(3)
    torch.rand(100)  # whatever else consumed the generator in between
    seed_global_rng(1, 5, 0)
    assert torch.equal(torch.rand(3), first)
    seed_global_rng(1, 6, 0)
    assert not torch.equal(torch.rand(3), first)
