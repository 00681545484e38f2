"""Feature alignment inside the diffusion training scripts: it changes training, resumes exactly, runs under DDP."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from medsyn.train_scripts import train_expert, train_score_langevin
from medsyn.training.feature_alignment import EXPERT_NOISE_KEY

from .conftest import assert_same_weights
from .ddp_launch import run_two_ranks
from .test_train_score_langevin import TINY as SCORE_TINY


@pytest.fixture(scope="module")
def expert_path(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("expert")
    train_expert.main(train_expert.parse_args([
        "--resolution", "24", "--embedding_size", "8", "--hidden_sizes", "8", "16", "--depths", "1", "1",
        "--layer_type", "basic", "--simulated_num_images", "40", "--train_batch_size", "8", "--max_train_steps", "2",
        "--report_to", "none", "--output_dir", str(out)]))
    return str(out)


def noise_aware_expert(out, process: str, accuracy: dict | None = None) -> str:
    """A tiny expert trained on ``process`` noise at the tiny diffusion models' 16 px; ``accuracy`` replaces its
    measured table, so that tests know which levels are informative."""
    train_expert.main(train_expert.parse_args([
        "--resolution", "16", "--embedding_size", "8", "--hidden_sizes", "8", "16", "--depths", "1", "1",
        "--layer_type", "basic", "--simulated_num_images", "40", "--train_batch_size", "8", "--max_train_steps", "2",
        "--report_to", "none", "--noise_augment", process, "--noise_eval_levels", "3", "--output_dir", str(out)]))
    if accuracy is not None:
        config = json.loads((out / "config.json").read_text())
        config[EXPERT_NOISE_KEY]["accuracy"] = accuracy
        (out / "config.json").write_text(json.dumps(config))
    return str(out)


@pytest.fixture(scope="module")
def ve_expert_path(tmp_path_factory) -> str:
    """Informative (accuracy 1.0 and 0.9 over chance 0.5) up to sigma 1, guessing at sigma 100."""
    table = {"sigmas": [0.01, 1.0, 100.0], "accuracies": [1.0, 0.9, 0.5], "chance": 0.5}
    return noise_aware_expert(tmp_path_factory.mktemp("ve_expert"), "ve", table)


def score_run(tmp_path, name, *extra):
    args = [*SCORE_TINY, "--class_conditional", "--validation_steps", "100", "--output_dir", str(tmp_path / name)]
    return train_score_langevin.main(train_score_langevin.parse_args([*args, *extra]))


def test_aligned_score_training_differs_from_plain_and_saves_the_projection_with_checkpoints(expert_path, tmp_path):
    common = ["--max_train_steps", "3", "--checkpointing_steps", "3", "--learning_rate", "1e-3"]
    plain = score_run(tmp_path, "plain", *common)
    aligned = score_run(tmp_path, "aligned", *common, "--align_expert", expert_path, "--align_weight", "1.0")
    assert any(not torch.equal(v, plain.state_dict()[k]) for k, v in aligned.state_dict().items())
    head = load_file(tmp_path / "aligned" / "checkpoint-3" / "model_1.safetensors")
    assert head["mlp.0.weight"].shape == (16, 16) and head["mlp.4.weight"].shape == (16, 16)  # UNet 16 -> expert 16
    assert not (tmp_path / "aligned" / "unet" / "model_1.safetensors").exists()
    card = (tmp_path / "aligned" / "README.md").read_text()
    assert "block `down_blocks.-1`, the expert sees the noisy input" in card
    assert "every noise level weighted equally (the expert has no accuracy per noise level)" in card


@pytest.mark.parametrize("resolution", [16, 24])
def test_the_alignment_weight_is_against_the_per_value_dsm_at_every_resolution(expert_path, tmp_path, monkeypatch,
                                                                              resolution):
    """The DSM loss sums over an image's values; the alignment term is scaled by half their count, so that
    --align_weight means what it means against MediSyn's per-value MSE (once 1/2048 of it at 64 px)."""
    seen = []

    def recording_loop(args, run, loss_fn, **kwargs):
        def recorded(batch, step):
            losses = loss_fn(batch, step)
            seen.append({name: value.item() for name, value in losses.items()})
            return losses
        return training_loop(args, run, recorded, **kwargs)

    training_loop = train_score_langevin.training_loop
    monkeypatch.setattr(train_score_langevin, "training_loop", recording_loop)
    score_run(tmp_path, "aligned", "--max_train_steps", "2", "--resolution", str(resolution), "--align_expert",
              expert_path, "--align_weight", "0.3")
    assert len(seen) == 2
    for losses in seen:
        expected = losses["dsm_loss"] + 0.3 * resolution**2 / 2 * losses["align_loss"]  # one channel
        assert losses["align_loss"] > 0.1
        assert losses["loss"] == pytest.approx(expected, rel=1e-5)
    assert "weight 0.3 per value" in (tmp_path / "aligned" / "README.md").read_text()


def test_levels_where_the_expert_guesses_teach_the_unet_nothing(ve_expert_path, tmp_path):
    """Above the margin no level is informative: every weight is 0 and the UNet trains exactly as without alignment;
    below it the UNet changes. Clipping is out of reach (a norm of 1e30): the joint norm also sums the head's zero
    gradients, whose rounding AdamW would turn into changes of up to the learning rate on some processors."""
    common = ["--max_train_steps", "3", "--learning_rate", "1e-3", "--max_grad_norm", "1e30"]
    plain = score_run(tmp_path, "plain", *common)
    aligned = ["--align_expert", ve_expert_path, "--align_weight", "1.0"]
    silent = score_run(tmp_path, "silent", *common, *aligned, "--align_min_margin", "0.6")
    active = score_run(tmp_path, "active", *common, *aligned, "--align_min_margin", "0.1")

    def largest_change(model):
        return max((v - plain.state_dict()[k]).abs().max().item() for k, v in model.state_dict().items())

    assert largest_change(silent) == 0
    assert largest_change(active) > 1e-4
    card = (tmp_path / "active" / "README.md").read_text()
    assert "weighted by the expert's accuracy over chance (margin 0.1; informative for sigma 0.01 to 1)" in card


def test_an_expert_of_the_other_noise_process_is_refused(ve_expert_path, vae_path, tmp_path):
    from medsyn.train_scripts import train_medisyn

    from .test_train_medisyn import TINY_MODEL, TINY_RUN

    argv = [*TINY_RUN, *TINY_MODEL, "--vae_model_name_or_path", vae_path, "--max_train_steps", "1",
            "--align_expert", ve_expert_path, "--output_dir", str(tmp_path / "medisyn")]
    with pytest.raises(ValueError, match="trained on ve noise.*--noise_augment ddpm"):
        train_medisyn.main(train_medisyn.parse_args(argv))
    ddpm_expert = noise_aware_expert(tmp_path / "ddpm_expert", "ddpm")
    train_medisyn.main(train_medisyn.parse_args([*argv[:-4], "--align_expert", ddpm_expert, *argv[-2:]]))
    with pytest.raises(ValueError, match="trained on ddpm noise.*--noise_augment ve"):
        score_run(tmp_path, "score", "--max_train_steps", "1", "--align_expert", ddpm_expert)


def test_aligned_score_training_resumes_exactly(ve_expert_path, tmp_path):
    extra = ["--align_expert", ve_expert_path, "--align_block", "mid_block", "--checkpointing_steps", "2",
             "--learning_rate", "1e-3"]
    straight = score_run(tmp_path, "straight", *extra, "--max_train_steps", "4")
    score_run(tmp_path, "resumed", *extra, "--max_train_steps", "2")
    resumed = score_run(tmp_path, "resumed", *extra, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert_same_weights(resumed, straight)


def test_an_unknown_block_is_named(expert_path, tmp_path):
    with pytest.raises(ValueError, match="--align_block 'down_blocks.9'"):
        score_run(tmp_path, "x", "--max_train_steps", "1", "--align_expert", expert_path, "--align_block",
                  "down_blocks.9")


@pytest.mark.slow
def test_two_process_ddp_with_alignment_keeps_ranks_identical(expert_path, tmp_path):
    out = tmp_path / "ddp"
    ranks = run_two_ranks(tmp_path, "medsyn.train_scripts.train_score_langevin", [
        *SCORE_TINY, "--class_conditional", "--max_train_steps", "3", "--validation_steps", "100",
        "--align_expert", expert_path, "--output_dir", str(out)])
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]


def test_aligned_medisyn_training_for_full_weights_and_lora(expert_path, vae_path, tmp_path):
    from medsyn import MediSynPipeline
    from medsyn.train_scripts import train_medisyn

    from .test_train_medisyn import TINY_MODEL, TINY_RUN


    def run(name, *extra):
        argv = [*TINY_RUN, "--output_dir", str(tmp_path / name), "--learning_rate", "1e-3", *extra]
        return train_medisyn.main(train_medisyn.parse_args(argv))

    scratch = [*TINY_MODEL, "--vae_model_name_or_path", vae_path, "--max_train_steps", "2"]
    plain = run("plain", *scratch)
    aligned = run("aligned", *scratch, "--align_expert", expert_path, "--align_weight", "1.0")
    assert any(not torch.equal(v, plain.unet.state_dict()[k]) for k, v in aligned.unet.state_dict().items())
    assert "the expert sees the noisy input" in (tmp_path / "aligned" / "README.md").read_text()
    assert not aligned.unet.down_blocks[-1]._forward_hooks  # the training hook is gone from the saved model
    run("lora", "--pretrained_model_name_or_path", str(tmp_path / "plain"), "--resolution", "16", "--use_lora",
        "--max_train_steps", "2", "--align_expert", expert_path, "--align_on", "clean")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "the expert sees the clean input" in (tmp_path / "lora" / "README.md").read_text()
    MediSynPipeline.from_pretrained(tmp_path / "plain").load_lora_weights(tmp_path / "lora")  # loads without it


def test_aligned_medisyn_training_resumes_exactly(expert_path, vae_path, tmp_path):
    from medsyn.train_scripts import train_medisyn

    from .test_train_medisyn import TINY_MODEL, TINY_RUN

    extra = [*TINY_RUN, *TINY_MODEL, "--vae_model_name_or_path", vae_path, "--align_expert",
             expert_path, "--checkpointing_steps", "2", "--learning_rate", "1e-3"]

    def run(name, *more):
        return train_medisyn.main(train_medisyn.parse_args([*extra, "--output_dir", str(tmp_path / name), *more]))

    straight = run("straight", "--max_train_steps", "4")
    run("resumed", "--max_train_steps", "2")
    resumed = run("resumed", "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert_same_weights(resumed.unet, straight.unet)


@pytest.mark.slow
def test_two_process_ddp_medisyn_with_alignment_keeps_ranks_identical(expert_path, vae_path, tmp_path):
    from .test_train_medisyn import TINY_MODEL, TINY_RUN

    out = tmp_path / "ddp"
    ranks = run_two_ranks(tmp_path, "medsyn.train_scripts.train_medisyn", [
        *TINY_MODEL, *TINY_RUN, "--vae_model_name_or_path", vae_path, "--max_train_steps", "3",
        "--align_expert", expert_path, "--output_dir", str(out)])
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
