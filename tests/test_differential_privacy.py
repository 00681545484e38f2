"""DP-SGD: each sample's gradient is its own (averaged over K noise draws) and clipped, the noise is solved for the
budget, the card's epsilon is the accountant's for the steps run (also across a resume), and what DP cannot do is
refused by name."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from safetensors.torch import load_file

from medsyn.models.ddpm_unet import ddpm_unet_config
from medsyn.train_scripts import train_ddpm, train_score_langevin
from medsyn.training.differential_privacy import PrivacyBudget, PrivateTraining, make_private, noise_multiplier_for
from medsyn.training.loop import TrainingStep

TINY = [
    "--resolution", "16", "--base_channels", "8", "--channel_mult", "1", "2", "--layers_per_block", "1",
    "--norm_num_groups", "4", "--simulated_num_images", "24", "--train_batch_size", "4",
    "--num_validation_images", "1", "--report_to", "none", "--seed", "7", "--validation_steps", "1000",
    "--class_conditional",
]
DDPM_TINY = TINY + ["--validation_inference_steps", "3"]


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**ddpm_unet_config(sample_size=8, in_channels=1, num_classes=2, base_channels=8,
                                          channel_mult=(1, 2), layers_per_block=1, norm_num_groups=4))


def loader_of(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> torch.utils.data.DataLoader:
    rows = [{"image": image, "label": int(label)} for image, label in zip(images, labels)]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, collate_fn=lambda batch: {
        "pixel_values": torch.stack([row["image"] for row in batch]),
        "labels": torch.tensor([row["label"] for row in batch])})


def pixel_unet_case():
    """The DDPM/score UNet: (model, inputs, conditioning, forward(model, x, t, conditioning))."""
    return (tiny_unet(), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 1, 0]),
            lambda model, x, t, labels: model(x, t, class_labels=labels).sample)


def latent_unet_case():
    """MediSyn's UNet2DConditionModel, attending to per-sample prompt states (cross-attention)."""
    from .conftest import get_dummy_medisyn_components

    unet = get_dummy_medisyn_components()["unet"]
    return (unet, torch.randn(4, 4, 8, 8), torch.randn(4, 5, 32),
            lambda model, x, t, states: model(x, t, encoder_hidden_states=states).sample)


@pytest.mark.parametrize("case", [pixel_unet_case, latent_unet_case])
@pytest.mark.parametrize("multiplicity", [1, 3])
def test_each_sample_gradient_is_its_own_mean_over_draws_and_is_clipped(case, multiplicity):
    """Brute force: sample b's gradient, from a plain backward of the mean loss over its own K rows alone, equals
    the per-sample gradient DP-SGD clips; with no noise the update is the mean of the clipped gradients."""
    unet, images, conditioning, forward = case()
    clip = 1e-3
    optimizer = torch.optim.SGD(unet.parameters(), lr=0.0)
    budget = PrivacyBudget(epsilon=1.0, delta=1e-3, max_grad_norm=clip, noise_multiplicity=multiplicity)
    private = PrivateTraining(budget, unet, optimizer, loader_of(images, torch.zeros(4), 4), batch_size=4,
                              steps_for=lambda batches: 1, noise_multiplier=0.0)
    drawn = {}

    def loss_fn(batch, step):
        rows = len(batch["pixel_values"])
        drawn["noise"] = torch.randn(batch["pixel_values"].shape, generator=torch.Generator().manual_seed(1))
        drawn["t"] = torch.randint(0, 1000, (rows,), generator=torch.Generator().manual_seed(2))
        prediction = forward(private.model, batch["pixel_values"] + drawn["noise"], drawn["t"], batch["condition"])
        return {"loss": F.mse_loss(prediction, drawn["noise"])}

    private.backward(loss_fn, {"pixel_values": images, "condition": conditioning},
                     TrainingStep(torch.Generator(), 0, 0))
    parameters = private.parameters
    per_sample = [torch.cat([p.grad_sample[b].flatten() for p in parameters]) for b in range(4)]

    private.detach()
    for b in range(4):
        unet.zero_grad()
        rows = slice(b * multiplicity, (b + 1) * multiplicity)
        own = forward(unet, images[b:b + 1].repeat_interleave(multiplicity, 0) + drawn["noise"][rows],
                      drawn["t"][rows], conditioning[b:b + 1].repeat_interleave(multiplicity, 0))
        F.mse_loss(own, drawn["noise"][rows]).backward()
        brute = torch.cat([p.grad.flatten() for p in parameters])
        torch.testing.assert_close(per_sample[b], brute, rtol=1e-3, atol=1e-6)
        assert brute.norm() > 10 * clip  # so the clip below is doing the work

    private.optimizer.pre_step()
    update = torch.cat([p.grad.flatten() for p in parameters])
    expected = sum(g * min(1.0, clip / g.norm().item()) for g in per_sample) / 4
    torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-9)
    assert update.norm() <= clip * (1 + 1e-4)


def test_an_empty_poisson_batch_is_a_noise_only_step():
    unet = tiny_unet()
    private = PrivateTraining(PrivacyBudget(epsilon=1.0, delta=1e-3), unet, torch.optim.SGD(unet.parameters(), lr=0.0),
                              loader_of(torch.randn(4, 1, 8, 8), torch.zeros(4), 2), batch_size=2,
                              steps_for=lambda batches: 10, noise_multiplier=1.0)
    assert private.backward(None, None, TrainingStep(torch.Generator(), 0, 0)) == {}
    private.optimizer.step()
    update = torch.cat([p.grad.flatten() for p in private.parameters])
    # std noise_multiplier x clip / expected batch = 0.5 per coordinate
    assert abs(update.std().item() - 0.5) < 0.05
    assert private.report().steps == 1
    sizes = [len(batch["labels"]) if batch else 0 for _ in range(200) for batch in private.dataloader]
    assert set(sizes) == {0, 1, 2, 3, 4} and abs(np.mean(sizes) - 2) < 0.2  # Poisson: each image with q = 1/2


def test_noise_is_solved_for_the_budget_and_an_impossible_one_is_refused():
    budget = PrivacyBudget(epsilon=2.0, delta=1e-5, accountant="rdp")
    sigma = noise_multiplier_for(budget, sample_rate=0.01, steps=1000)
    accountant = RDPAccountant()
    accountant.history = [(sigma, 0.01, 1000)]
    assert 1.97 <= accountant.get_epsilon(1e-5) <= 2.0  # met, within the solver's 1% tolerance
    accountant.history = [(sigma * 0.9, 0.01, 1000)]
    assert accountant.get_epsilon(1e-5) > 2.0  # and not by much more noise than needed
    with pytest.raises(ValueError, match="cannot be met"):
        noise_multiplier_for(PrivacyBudget(epsilon=1e-9, delta=1e-9), sample_rate=1.0, steps=10_000)
    for bad in (dict(epsilon=float("nan"), delta=1e-5), dict(epsilon=1.0, delta=1.0),
                dict(epsilon=1.0, delta=1e-5, noise_multiplicity=0), dict(epsilon=1.0, delta=1e-5, accountant="gdp")):
        with pytest.raises(ValueError):
            PrivacyBudget(**bad)


def test_a_delta_that_allows_releasing_an_image_and_several_processes_are_refused():
    unet = tiny_unet()
    loader = loader_of(torch.randn(4, 1, 8, 8), torch.zeros(4), 2)
    with pytest.raises(ValueError, match="dp_delta .* must be below 1 / training images"):
        PrivateTraining(PrivacyBudget(epsilon=1.0, delta=0.3), unet, torch.optim.SGD(unet.parameters(), lr=0.1),
                        loader, batch_size=2, steps_for=lambda batches: 10)
    args = SimpleNamespace(dp_epsilon=1.0, dp_delta=None, dp_max_grad_norm=1.0, dp_noise_multiplicity=1,
                           dp_accountant="prv", train_batch_size=2)
    with pytest.raises(ValueError, match="one process"):
        make_private(args, SimpleNamespace(num_processes=2), unet, torch.optim.SGD(unet.parameters(), lr=0.1),
                     loader)


def test_flags_dp_cannot_honour_are_refused_by_name(capsys):
    def refused(parse, argv):
        with pytest.raises(SystemExit):
            parse(argv)
        return capsys.readouterr().err

    for extra, flag in ((["--gradient_accumulation_steps", "2"], "--gradient_accumulation_steps"),
                        (["--gradient_checkpointing"], "--gradient_checkpointing"),
                        (["--mixed_precision", "bf16"], "--mixed_precision")):
        assert flag in refused(train_ddpm.parse_args, DDPM_TINY + ["--dp_epsilon", "5", *extra])
    assert "--dp_delta needs --dp_epsilon" in refused(train_ddpm.parse_args, DDPM_TINY + ["--dp_delta", "1e-5"])
    # the score model's default sigma_max is measured on the training images, outside the guarantee
    assert "--sigma_max" in refused(train_score_langevin.parse_args, TINY + ["--dp_epsilon", "5"])
    assert train_score_langevin.parse_args(TINY + ["--dp_epsilon", "5", "--sigma_max", "8"]).dp_epsilon == 5


def test_the_card_reports_the_accountants_epsilon_for_the_steps_run_across_a_resume(tmp_path):
    dp = ["--dp_epsilon", "6", "--dp_noise_multiplicity", "2", "--checkpointing_steps", "2"]
    run = DDPM_TINY + ["--output_dir", str(tmp_path / "dp"), "--max_train_steps", "4", *dp]
    train_ddpm.main(train_ddpm.parse_args(run))
    # resumed from step 2: without the accountant's saved history the summary would count 2 steps, not 4
    train_ddpm.main(train_ddpm.parse_args(run + ["--resume_from_checkpoint", "checkpoint-2"]))
    summary = json.loads((tmp_path / "dp" / "training_summary.json").read_text())
    private = summary["differential_privacy"]
    # delta: the largest power of ten at most 1 / (100 x 24 images); the sample rate 4/24 shown to 2 digits
    assert private["steps"] == 4 and private["sample_rate"] == 0.17 and private["delta"] == 1e-4
    assert private["images_times_delta"] == 0.002
    assert private["noise_multiplier"] == get_noise_multiplier(target_epsilon=6, target_delta=1e-4,
                                                               sample_rate=4 / 24, steps=4, accountant="prv")
    accountant = PRVAccountant()
    accountant.history = [(private["noise_multiplier"], 4 / 24, 4)]
    assert private["epsilon"] == pytest.approx(accountant.get_epsilon(1e-4), rel=1e-9)
    assert private["epsilon"] <= 6
    card = (tmp_path / "dp" / "README.md").read_text()
    assert f"(epsilon {private['epsilon']:.3g}, delta 0.0001)-DP" in card and "noise multiplicity 2" in card
    # nothing about the data outside the guarantee: no unnoised loss, no exact image count
    assert summary["final_loss"].startswith("withheld") and "| training images | withheld (differentially" in card


def test_a_resume_with_a_larger_budget_solves_the_remaining_noise_and_the_card_shows_both(tmp_path):
    """--dp_epsilon 6 for 4 steps, resumed to 12: the noise of steps 5-12 is solved so that all 12 meet 6 (it once
    re-solved 12 steps as if none were spent, overshooting to 7.6 silently)."""
    dp = ["--dp_epsilon", "6", "--checkpointing_steps", "4", "--output_dir", str(tmp_path / "dp")]
    train_ddpm.main(train_ddpm.parse_args(DDPM_TINY + [*dp, "--max_train_steps", "4"]))
    first = json.loads((tmp_path / "dp" / "training_summary.json").read_text())["differential_privacy"]
    with pytest.warns(UserWarning, match="DP budget changed on resume"):
        train_ddpm.main(train_ddpm.parse_args(DDPM_TINY + [*dp, "--max_train_steps", "12",
                                                           "--resume_from_checkpoint", "latest"]))
    private = json.loads((tmp_path / "dp" / "training_summary.json").read_text())["differential_privacy"]
    (noise_1, _, steps_1), (noise_2, _, steps_2) = private["history"]
    assert (steps_1, steps_2) == (4, 8) and noise_1 == first["noise_multiplier"] and noise_2 > noise_1
    accountant = PRVAccountant()
    accountant.history = [(noise_1, 4 / 24, 4), (noise_2, 4 / 24, 8)]
    assert private["epsilon"] == pytest.approx(accountant.get_epsilon(1e-4), rel=1e-9)
    assert 5.9 <= private["epsilon"] <= 6.0
    card = (tmp_path / "dp" / "README.md").read_text()
    assert f"noise multiplier {noise_1:.4g} for 4 steps" in card
    assert f"then noise multiplier {noise_2:.4g} for 8" in card
    with pytest.raises(ValueError, match="already run spent"):  # a smaller epsilon than already spent is refused
        train_ddpm.main(train_ddpm.parse_args(DDPM_TINY + [*dp[:1], "0.5", *dp[2:], "--max_train_steps", "16",
                                                           "--resume_from_checkpoint", "latest"]))


def test_a_dp_run_and_a_plain_run_with_the_same_seed_differ(tmp_path):
    for name, extra in (("plain", []), ("dp", ["--dp_epsilon", "50"])):
        train_ddpm.main(train_ddpm.parse_args(
            DDPM_TINY + ["--output_dir", str(tmp_path / name), "--max_train_steps", "2", *extra]))
    plain, private = (load_file(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors")
                      for name in ("plain", "dp"))
    assert plain.keys() == private.keys()
    assert max((plain[k] - private[k]).abs().max().item() for k in plain) > 1e-4
    assert json.loads((tmp_path / "plain" / "training_summary.json").read_text())["differential_privacy"] is None
    assert "off: no formal guarantee" in (tmp_path / "plain" / "README.md").read_text()
    assert np.isfinite(json.loads((tmp_path / "dp" / "training_summary.json").read_text())
                       ["differential_privacy"]["epsilon"])


def test_the_score_model_trains_privately_without_reading_the_data_for_its_schedule(tmp_path):
    model = train_score_langevin.main(train_score_langevin.parse_args(
        TINY + ["--output_dir", str(tmp_path / "score"), "--max_train_steps", "2", "--dp_epsilon", "8",
                "--sigma_max", "8", "--num_noise_levels", "4", "--validation_num_levels", "2", "--n_steps_each", "1"]))
    assert isinstance(model, UNet2DModel) and not any(m._forward_hooks for m in model.modules())
    summary = json.loads((tmp_path / "score" / "training_summary.json").read_text())
    assert summary["differential_privacy"]["steps"] == 2
