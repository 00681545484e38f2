"""The helpers every training script shares: step budget, Hub upload, global reseeding."""

from __future__ import annotations

import argparse

import torch

from medsyn.training.accelerator import step_budget
from medsyn.training.checkpoints import seed_global_rng
from medsyn.training.script_args import push_output_to_hub


def test_step_budget_counts_optimiser_steps_from_the_prepared_loader():
    args = argparse.Namespace(gradient_accumulation_steps=2, max_train_steps=None, num_train_epochs=3)
    assert step_budget(args, 7) == (4, 12, 3)  # 7 batches, 2 per update: the last update takes one batch
    args.max_train_steps = 10
    assert step_budget(args, 7) == (4, 10, 3)


def test_push_uploads_the_model_without_checkpoints_or_logs(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class Repo:
        repo_id = "user/medisyn-test"

    def create_repo(name, **kwargs):
        calls["create"] = (name, kwargs)
        return Repo

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: calls.setdefault("upload", kwargs))
    assert push_output_to_hub(tmp_path / "medisyn-test", None, "token") == "user/medisyn-test"
    assert calls["create"][0] == "medisyn-test" and calls["create"][1]["token"] == "token"
    assert calls["upload"]["repo_id"] == "user/medisyn-test"
    assert set(calls["upload"]["ignore_patterns"]) == {"checkpoint-*", "logs/*", "validation/*"}


def test_global_reseeding_depends_only_on_the_key():
    seed_global_rng(1, 5, 0)
    first = torch.rand(3)
    torch.rand(100)  # whatever else consumed the generator in between
    seed_global_rng(1, 5, 0)
    assert torch.equal(torch.rand(3), first)
    seed_global_rng(1, 6, 0)
    assert not torch.equal(torch.rand(3), first)
