"""The training script on CPU: a few steps on tiny models, resume, save/reload, and (slow) two DDP ranks."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsyn.pipelines import ScoreLangevinPipeline
from medsyn.train_scripts.train_score_langevin import main, parse_args
from medsyn.training.class_conditional import class_sample_grid

from .conftest import assert_same_weights
from .ddp_launch import run_two_ranks

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--resolution", "16", "--base_channels", "8", "--channel_mult", "1", "2", "--layers_per_block", "1",
    "--norm_num_groups", "4", "--simulated_num_images", "24", "--train_batch_size", "4",
    "--num_noise_levels", "6", "--n_steps_each", "2", "--validation_num_levels", "3",
    "--num_validation_images", "2", "--report_to", "none", "--seed", "7",
]


def run(tmp_path, name, *extra):
    return main(parse_args(TINY + ["--output_dir", str(tmp_path / name), *extra]))


def test_train_save_reload_gives_identical_images(tmp_path):
    model = run(tmp_path, "run", "--class_conditional", "--use_ema", "--max_train_steps", "4", "--augment",
                "--checkpointing_steps", "100", "--validation_steps", "2")
    out = tmp_path / "run"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "validation" / "step-000002.png").is_file()
    card = (out / "README.md").read_text()
    assert "healthy, tumor" in card and "| optimiser steps, batch size | 4, 4" in card and "$" not in card
    pipe = ScoreLangevinPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert_same_weights(pipe.unet, model)
    saved_grid = np.asarray(Image.open(out / "samples.png"))
    np.testing.assert_array_equal(class_sample_grid(pipe, ["healthy", "tumor"], 2, 1.0, 7, num_inference_steps=3),
                                  saved_grid)


@pytest.mark.parametrize("use_ema", [False, True])
def test_resume_ends_with_the_same_weights(tmp_path, use_ema):
    extra = ["--class_conditional", "--augment", "--checkpointing_steps", "3", "--validation_steps", "100",
             "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3"] + (["--use_ema"] if use_ema else [])
    straight = run(tmp_path, "straight", *extra, "--max_train_steps", "7")
    run(tmp_path, "resumed", *extra, "--max_train_steps", "3")
    assert (tmp_path / "resumed" / "checkpoint-3").is_dir()
    if use_ema:
        assert (tmp_path / "resumed" / "checkpoint-3" / "unet_ema" / "diffusion_pytorch_model.safetensors").is_file()
    resumed = run(tmp_path, "resumed", *extra, "--max_train_steps", "7", "--resume_from_checkpoint", "latest")
    assert_same_weights(resumed, straight)


def test_trains_on_an_image_folder_with_rgb(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("normal", "glaucoma"):
        (tmp_path / "fundus" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "fundus" / name / f"{i}.png")
    model = run(tmp_path, "rgb", "--train_data_dir", str(tmp_path / "fundus"), "--class_conditional",
                "--max_train_steps", "2", "--checkpointing_steps", "100", "--validation_steps", "100")
    assert model.config.in_channels == 3
    pipe = ScoreLangevinPipeline.from_pretrained(tmp_path / "rgb")
    assert pipe.class_names == ["glaucoma", "normal"]
    assert np.asarray(Image.open(tmp_path / "rgb" / "samples.png")).shape == (32, 32, 3)


def test_trains_on_a_saved_dataset_with_other_column_names(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(6)]
    rows = {"scan": images, "finding": ["tumour", "none", "none", "tumour", "none", "tumour"]}
    datasets.Dataset.from_dict(rows, features=datasets.Features({"scan": datasets.Image(), "finding": datasets.Value("string")})
                               ).save_to_disk(tmp_path / "saved")
    common = ["--dataset_name", str(tmp_path / "saved"), "--image_column", "scan", "--max_train_steps", "2",
              "--checkpointing_steps", "100", "--validation_steps", "100"]
    model = run(tmp_path, "saved-run", *common, "--label_column", "finding", "--class_conditional",
                "--num_channels", "1")
    assert model.config.in_channels == 1
    assert ScoreLangevinPipeline.from_pretrained(tmp_path / "saved-run").class_names == ["none", "tumour"]
    unconditional = run(tmp_path, "unconditional", *common, "--label_column", "absent")
    assert unconditional.config.in_channels == 3 and unconditional.config.num_class_embeds is None
    with pytest.raises(ValueError, match="no column 'absent'"):
        run(tmp_path, "x", *common, "--label_column", "absent", "--class_conditional")


def test_fine_tune_from_pretrained(tmp_path):
    run(tmp_path, "base", "--class_conditional", "--max_train_steps", "2", "--checkpointing_steps", "100",
        "--validation_steps", "100")
    base = ScoreLangevinPipeline.from_pretrained(tmp_path / "base")
    tuned = run(tmp_path, "tuned", "--pretrained_model_name_or_path", str(tmp_path / "base"), "--class_conditional",
                "--max_train_steps", "2", "--checkpointing_steps", "100", "--validation_steps", "100")
    loaded = ScoreLangevinPipeline.from_pretrained(tmp_path / "tuned")
    assert loaded.scheduler.config == base.scheduler.config
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert changed


EDM_TINY = [flag for flag in TINY if flag not in ("--num_noise_levels", "6")]


def test_edm_preconditioned_training_saves_a_model_that_samples_with_edm_heun(tmp_path):
    from medsyn.models.preconditioning import edm_preconditioning
    from medsyn.schedulers import EDMHeunScheduler

    out = tmp_path / "edm"
    model = main(parse_args([*EDM_TINY, "--output_dir", str(out), "--preconditioning", "edm", "--class_conditional",
                             "--max_train_steps", "3", "--checkpointing_steps", "100", "--validation_steps", "100",
                             "--learning_rate", "1e-3"]))
    sigma_data = edm_preconditioning(model).sigma_data
    assert 0.1 < sigma_data < 1.0  # the simulated slices' sd in [-1, 1], measured
    pipe = ScoreLangevinPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, EDMHeunScheduler)
    assert edm_preconditioning(pipe.unet).sigma_data == pytest.approx(sigma_data)
    card = (out / "README.md").read_text()
    assert f"EDM preconditioning (sigma_data {sigma_data:.4g}), ln(sigma) ~ N(-1.2, 1.2^2)" in card
    assert "EDM Heun, 3 steps (5 evaluations)" in card and "$" not in card
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(class_sample_grid(pipe, ["healthy", "tumor"], 2, 1.0, 7, num_inference_steps=3),
                                  np.asarray(Image.open(out / "samples.png")))
    with pytest.raises(SystemExit):
        parse_args([*TINY, "--preconditioning", "edm"])  # --num_noise_levels is Langevin's
    with pytest.raises(ValueError, match="pretrained model is edm-parameterised"):
        run(tmp_path, "x", "--pretrained_model_name_or_path", str(out), "--class_conditional", "--max_train_steps", "1")


def test_a_model_saved_before_preconditioning_was_recorded_samples_as_before(tmp_path):
    import json

    run(tmp_path, "old", "--class_conditional", "--max_train_steps", "2", "--checkpointing_steps", "100",
        "--validation_steps", "100")
    before = class_sample_grid(ScoreLangevinPipeline.from_pretrained(tmp_path / "old"), ["healthy", "tumor"], 2, 2.0,
                               3, num_inference_steps=3)
    config_path = tmp_path / "old" / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    assert config.pop("_score_preconditioning") == {"type": "ncsn"}
    config_path.write_text(json.dumps(config))
    after = class_sample_grid(ScoreLangevinPipeline.from_pretrained(tmp_path / "old"), ["healthy", "tumor"], 2, 2.0,
                              3, num_inference_steps=3)
    np.testing.assert_array_equal(before, after)


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--train_data_dir", "a", "--dataset_name", "b"])
    with pytest.raises(SystemExit):
        parse_args(["--resolution", "18", "--channel_mult", "1", "2", "4"])
    with pytest.raises(ValueError, match="no such file or folder"):
        run(tmp_path, "x", "--train_data_dir", str(tmp_path / "missing"))


@pytest.mark.slow
def test_two_process_ddp_ranks_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    ranks = run_two_ranks(tmp_path, "medsyn.train_scripts.train_score_langevin", [
        *TINY, "--class_conditional", "--use_ema", "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--validation_steps", "100", "--output_dir", str(out)])
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert "| optimiser steps, batch size | 4, 4 (x1 accumulation, 2 processes)" in (out / "README.md").read_text()


def test_the_guidance_a_model_was_judged_at_is_its_default(tmp_path):
    """The card's samples use --validation_guidance_scale; loading the model and calling it without a guidance
    weight gives those images, not unguided ones (the default was 1.0, so README commands gave other pictures)."""
    run(tmp_path, "guided", "--class_conditional", "--max_train_steps", "2", "--checkpointing_steps", "100",
        "--validation_steps", "100", "--validation_guidance_scale", "4.0")
    pipe = ScoreLangevinPipeline.from_pretrained(tmp_path / "guided")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.guidance_default == 4.0

    def images(**kwargs):
        return pipe(class_labels=["tumor", "healthy"], num_inference_steps=3, output_type="np",
                    generator=torch.Generator().manual_seed(1), **kwargs).images

    np.testing.assert_array_equal(images(), images(guidance_scale=4.0))
    assert not np.array_equal(images(), images(guidance_scale=1.0))
    assert ScoreLangevinPipeline(**pipe.components).guidance_default == 4.0
    unsaved = ScoreLangevinPipeline(pipe.unet, pipe.scheduler, class_names=pipe.class_names)
    assert unsaved.guidance_default == 1.0
