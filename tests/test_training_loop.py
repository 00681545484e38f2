"""The shared training loop: step bookkeeping, accumulation, EMA, validation schedule, the loss guard, resume."""

from __future__ import annotations

import argparse

import pytest
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from medsyn.training.accelerator import build_lr_scheduler, step_budget
from medsyn.training.loop import TrainingRun, training_loop


def flags(tmp_path, **overrides) -> argparse.Namespace:
    values = dict(seed=0, gradient_accumulation_steps=1, max_grad_norm=1.0, checkpointing_steps=1000,
                  checkpoints_total_limit=None, validation_steps=1000, validation_epochs=None,
                  resume_from_checkpoint=None, output_dir=str(tmp_path), tracker_project_name=None,
                  max_train_steps=None, num_train_epochs=1, lr_scheduler="constant", lr_warmup_steps=0)
    values.update(overrides)
    return argparse.Namespace(**values)


def linear_run(args, num_images=10, batch_size=2, ema=False):
    """A 1-weight linear model fitted to y = 3x by least squares, its run and the calls ``loss_fn`` saw."""
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=True)
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    x = torch.linspace(-1, 1, num_images)[:, None]
    data = [{"x": xi, "y": 3 * xi} for xi in x]
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    updates_per_epoch, max_train_steps, _ = step_budget(args, len(loader))
    scheduler = build_lr_scheduler(args, accelerator, optimizer, max_train_steps)
    average = EMAModel(model.parameters(), decay=0.5) if ema else None
    run = TrainingRun(accelerator, [model], list(model.parameters()), optimizer, scheduler, loader,
                      updates_per_epoch, max_train_steps, average)
    calls = []

    def loss_fn(batch, step):
        calls.append((step.micro_step, step.global_step))
        return {"loss": ((model(batch["x"]) - batch["y"]) ** 2).mean(), "constant": 2.0}

    return run, loss_fn, calls


def test_runs_exactly_the_step_budget_with_accumulation(tmp_path):
    args = flags(tmp_path, gradient_accumulation_steps=2, num_train_epochs=2)
    run, loss_fn, calls = linear_run(args)  # 5 batches per epoch: updates of 2, 2, 1 batches
    assert (run.updates_per_epoch, run.max_train_steps) == (3, 6)
    result = training_loop(args, run, loss_fn, tracker_project_name="test")
    assert result.global_step == 6
    assert [micro for micro, _ in calls] == list(range(10))
    assert [step for _, step in calls] == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]
    assert result.recent["constant"] == [2.0] * 6 and len(result.recent["loss"]) == 6
    assert result.mean("constant") == "2.0000"


def test_stops_at_max_train_steps_mid_epoch_and_fits_the_model(tmp_path):
    args = flags(tmp_path, max_train_steps=7, num_train_epochs=None, max_grad_norm=100.0)
    run, loss_fn, calls = linear_run(args)
    result = training_loop(args, run, loss_fn, tracker_project_name="test")
    assert result.global_step == 7 and len(calls) == 7
    assert run.models[0].weight.item() == pytest.approx(3.0, abs=0.3)  # least squares converges towards y = 3x
    assert result.recent["loss"][-1] < result.recent["loss"][0]


@pytest.mark.parametrize("accumulation, updates", [(5, 1), (1, 5)])
def test_ema_steps_once_per_optimiser_step(tmp_path, accumulation, updates):
    args = flags(tmp_path, gradient_accumulation_steps=accumulation)
    run, loss_fn, _ = linear_run(args, ema=True)
    training_loop(args, run, loss_fn, tracker_project_name="test")
    assert run.ema.optimization_step == updates
    if updates == 1:  # diffusers' EMA takes the weights as they are at its first step (decay 0)
        assert run.ema.shadow_params[0].item() == run.models[0].weight.item() != 0.0


def test_validation_runs_on_schedule_and_models_return_to_train_mode(tmp_path):
    args = flags(tmp_path, validation_steps=2, num_train_epochs=2)
    run, loss_fn, _ = linear_run(args)
    seen = []

    def validate(step):
        run.models[0].eval()
        seen.append(step)

    modes = []
    original = loss_fn
    training_loop(args, run, lambda batch, step: (modes.append(run.models[0].training), original(batch, step))[1],
                  tracker_project_name="test", validate=validate)
    assert seen == [2, 4, 6, 8]  # not at the last step (10): the final model gets its own evaluation
    assert all(modes)


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    args = flags(tmp_path)
    run, loss_fn, _ = linear_run(args)

    def exploding(batch, step):
        losses = loss_fn(batch, step)
        return {**losses, "loss": losses["loss"] * (float("nan") if step.global_step == 3 else 1.0)}

    with pytest.raises(FloatingPointError, match="loss is nan at step 3; lower --learning_rate"):
        training_loop(args, run, exploding, tracker_project_name="test")


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_after_update_runs_each_micro_batch_after_the_main_step_and_is_logged(tmp_path):
    args = flags(tmp_path, gradient_accumulation_steps=2)
    run, loss_fn, calls = linear_run(args)
    order = []
    run.optimizer.step = lambda original=run.optimizer.step: (order.append("main"), original())[1]

    def after_update(batch, losses):
        order.append("after")
        assert "loss" in losses
        return {"second": torch.tensor(float(len(order)))}

    result = training_loop(args, run, loss_fn, tracker_project_name="test", after_update=after_update)
    assert order == ["main", "after"] * 5
    assert result.recent["second"] == [4.0, 8.0, 10.0]  # logged from each optimiser step's last micro-batch


def test_resume_continues_the_micro_step_sequence(tmp_path):
    args = flags(tmp_path, num_train_epochs=2, checkpointing_steps=3)
    run, loss_fn, straight = linear_run(args)
    training_loop(args, run, loss_fn, tracker_project_name="test")
    straight_weight = run.models[0].weight.item()

    args = flags(tmp_path / "resumed", num_train_epochs=2, checkpointing_steps=3, max_train_steps=3)
    run, loss_fn, _ = linear_run(args)
    training_loop(args, run, loss_fn, tracker_project_name="test")
    args = flags(tmp_path / "resumed", num_train_epochs=2, checkpointing_steps=3, resume_from_checkpoint="latest")
    run, loss_fn, resumed = linear_run(args)
    training_loop(args, run, loss_fn, tracker_project_name="test")
    assert resumed == straight[3:]
    assert run.models[0].weight.item() == straight_weight


@pytest.mark.parametrize("warmup", [0, 4])
def test_warm_up_steps_apply_to_the_constant_schedule(tmp_path, warmup):
    """diffusers' "constant" ignores --lr_warmup_steps; medsyn then warms up linearly, as the flag says."""
    args = flags(tmp_path, lr_warmup_steps=warmup)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.8)
    scheduler = build_lr_scheduler(args, accelerator, optimizer, 10)
    rates = []
    for _ in range(6):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    expected = [0.8] * 6 if not warmup else [0.0, 0.2, 0.4, 0.6, 0.8, 0.8]
    assert rates == pytest.approx(expected)
