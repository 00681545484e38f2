"""The DDPM baseline script on CPU: tiny models train, save a Hub-ready folder, resume exactly; 2 DDP ranks (slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medsyn.pipelines import ClassConditionalDDPMPipeline
from medsyn.train_scripts.train_ddpm import main, parse_args
from medsyn.training.class_conditional import class_sample_grid

from .conftest import assert_same_weights
from .ddp_launch import run_two_ranks

TINY = [
    "--resolution", "16", "--base_channels", "8", "--channel_mult", "1", "2", "--layers_per_block", "1",
    "--norm_num_groups", "4", "--simulated_num_images", "24", "--train_batch_size", "4",
    "--validation_inference_steps", "3", "--num_validation_images", "2", "--report_to", "none", "--seed", "7",
]


def run(tmp_path, name, *extra):
    return main(parse_args(TINY + ["--output_dir", str(tmp_path / name), *extra]))


def test_train_save_reload_gives_identical_images_and_a_card(tmp_path):
    model = run(tmp_path, "run", "--class_conditional", "--use_ema", "--max_train_steps", "4", "--augment",
                "--checkpointing_steps", "100", "--validation_steps", "2", "--validation_guidance_scale", "2")
    out = tmp_path / "run"
    card = (out / "README.md").read_text()
    assert "$" not in card and "healthy, tumor" in card and "1000 timesteps, linear betas, epsilon prediction" in card
    assert "ClassConditionalDDPMPipeline.from_pretrained" in card and "| optimiser steps, batch size | 4, 4" in card
    assert (out / "validation" / "step-000002.png").is_file()
    pipe = ClassConditionalDDPMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert_same_weights(pipe.unet, model)
    assert pipe.class_names == ["healthy", "tumor"] and type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    saved = np.asarray(Image.open(out / "samples.png"))
    np.testing.assert_array_equal(class_sample_grid(pipe, ["healthy", "tumor"], 2, 2.0, 7, num_inference_steps=3),
                                  saved)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_resume_ends_with_the_same_weights(tmp_path, prediction_type):
    extra = ["--class_conditional", "--use_ema", "--augment", "--checkpointing_steps", "3",
             "--validation_steps", "100",
             "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--prediction_type", prediction_type,
             "--snr_gamma", "5", "--noise_offset", "0.05"]
    straight = run(tmp_path, "straight", *extra, "--max_train_steps", "7")
    run(tmp_path, "resumed", *extra, "--max_train_steps", "3")
    assert (tmp_path / "resumed" / "checkpoint-3" / "unet_ema" / "diffusion_pytorch_model.safetensors").is_file()
    resumed = run(tmp_path, "resumed", *extra, "--max_train_steps", "7", "--resume_from_checkpoint", "latest")
    assert_same_weights(resumed, straight)


def test_training_lowers_the_noise_prediction_error(tmp_path):
    """Twenty steps at a high learning rate take the loss well below an untrained unet's (about 1 for epsilon)."""
    run(tmp_path, "run", "--max_train_steps", "20", "--learning_rate", "3e-3", "--checkpointing_steps", "100",
        "--validation_steps", "100")
    card = (tmp_path / "run" / "README.md").read_text()
    final_loss = float(card.split("| final training loss (mean of last 50 steps) | ")[1].split(" |")[0])
    assert final_loss < 0.5


def test_fine_tunes_a_saved_pipeline_and_generate_drives_it(tmp_path, capsys):
    from medsyn.cli import main as cli

    run(tmp_path, "base", "--class_conditional", "--max_train_steps", "2", "--checkpointing_steps", "100",
        "--validation_steps", "100", "--prediction_type", "v_prediction")
    tuned = run(tmp_path, "tuned", "--class_conditional", "--max_train_steps", "2", "--checkpointing_steps", "100",
                "--validation_steps", "100", "--pretrained_model_name_or_path", str(tmp_path / "base"))
    assert ClassConditionalDDPMPipeline.from_pretrained(tmp_path / "tuned").scheduler.config.prediction_type == \
        "v_prediction"
    assert any(not torch.equal(a, b) for a, b in zip(
        tuned.parameters(), ClassConditionalDDPMPipeline.from_pretrained(tmp_path / "base").unet.parameters()))
    common = ["generate", "--model", str(tmp_path / "tuned"), "--class-label", "tumor", "--num-inference-steps", "3",
              "--guidance-scale", "2", "--format", "npz"]
    assert cli([*common, "--num-images", "3", "--batch-size", "2", "--output-dir", str(tmp_path / "a")]) == 0
    assert cli([*common, "--num-images", "3", "--batch-size", "3", "--output-dir", str(tmp_path / "b")]) == 0
    first, second = (np.load(tmp_path / name / "samples.npz") for name in ("a", "b"))
    np.testing.assert_array_equal(first["images"], second["images"])  # image i depends only on (seed, i)
    assert first["labels"].tolist() == [1, 1, 1] and first["images"].shape == (3, 16, 16)
    assert cli([*common, "--num-images", "1", "--n-steps-each", "2", "--output-dir", str(tmp_path / "c")]) == 2
    assert "error: --n-steps-each applies to score-Langevin models only" in capsys.readouterr().err


def test_bad_arguments_fail_clearly():
    with pytest.raises(SystemExit):
        parse_args(["--resolution", "18", "--channel_mult", "1", "2", "4"])
    with pytest.raises(SystemExit):
        parse_args(["--validation_inference_steps", "20", "--num_train_timesteps", "10"])
    with pytest.raises(SystemExit):
        parse_args(["--prediction_type", "sample"])


@pytest.mark.slow
def test_two_process_ddp_ranks_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    ranks = run_two_ranks(tmp_path, "medsyn.train_scripts.train_ddpm", [
        *TINY, "--class_conditional", "--use_ema", "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--validation_steps", "100", "--output_dir", str(out)])
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert "| optimiser steps, batch size | 4, 4 (x1 accumulation, 2 processes)" in (out / "README.md").read_text()
