"""train_rlhf.py: rounds of generate -> rate -> selector and policy -> update -> evaluate, resumed exactly after a
crash, and paused for people to rate both aspects."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from medsyn.pipelines import load_pipeline
from medsyn.rlhf.policy import AlignmentPolicy
from medsyn.rlhf.ratings import Aspect, Rating, RatingsFile, image_digest
from medsyn.train_scripts import train_rlhf

from .test_rlhf_generator_updates import trained_on_flat_images


def brightness_rater(images: torch.Tensor, prompts: list[str]) -> list[int]:
    """A toy rater: 3 for bright images, 2 for middling, 1 for dark (the loop's ``--rater module:function``)."""
    brightness = images.flatten(1).mean(1)
    return (1 + (brightness > 0.45).long() + (brightness > 0.6).long()).tolist()


def class_rater(images: torch.Tensor, prompts: list[str]) -> dict[str, list[int]]:
    """A toy rater of both aspects: quality by brightness, prompt match 3 when the image is on its prompt's side of
    mid-grey ("bright" above, "dark" below), else 1."""
    bright = images.flatten(1).mean(1) > 0.5
    asked_bright = torch.tensor(["bright" in p for p in prompts])
    return {"quality": brightness_rater(images, prompts), "prompt_match": (1 + 2 * (bright == asked_bright)).tolist()}


@pytest.fixture(scope="module")
def generator_folder(tmp_path_factory) -> str:
    """The tiny DDPM trained on flat images, at 16 px (MS-SSIM's smallest), saved as a pipeline folder."""
    pipe = trained_on_flat_images(sample_size=16)
    folder = tmp_path_factory.mktemp("rlhf") / "ddpm"
    pipe.unet.requires_grad_(False)
    pipe.save_pretrained(folder)
    return str(folder)


def rlhf_args(generator_folder: str, output_dir, *extra: str):
    return train_rlhf.parse_args(rlhf_argv(generator_folder, output_dir, *extra))


def rlhf_argv(generator_folder: str, output_dir, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", generator_folder, "--output_dir", str(output_dir),
        "--pool_per_class", "12", "--held_out_per_class", "6", "--num_inference_steps", "4",
        "--guidance_scale", "1.0", "--selector_patch_size", "4", "--selector_hidden_size", "16",
        "--selector_num_attention_heads", "2", "--selector_num_hidden_layers", "1",
        "--selector_intermediate_size", "32", "--selector_steps", "30", "--selector_learning_rate", "1e-3",
        "--policy_patch_size", "4", "--policy_hidden_size", "16", "--policy_num_attention_heads", "2",
        "--policy_num_hidden_layers", "1", "--policy_intermediate_size", "32", "--policy_steps", "20",
        "--policy_learning_rate", "1e-3",
        "--updates_per_round", "6", "--update_batch_size", "8", "--learning_rate", "3e-3", "--lora_rank", "4",
        "--min_reward_spearman", "-1", "--report_to", "none", *extra]


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in metrics.items() if k != "update_seconds"} for metrics in history]


def test_rounds_run_rate_and_resume_exactly_after_a_crash(generator_folder, tmp_path):
    rater = ["--rater", "tests.test_train_rlhf:class_rater"]
    whole = train_rlhf.main(rlhf_args(generator_folder, tmp_path / "whole", "--rounds", "2", *rater))
    assert [m["round"] for m in whole] == [0, 1, 2]
    for metrics in whole:
        assert set(metrics["mean_rating_per_class"]) == {"dark", "bright"}
        assert 1 <= metrics["mean_rating"] <= 3 and 0 <= metrics["ms_ssim"] <= 1
        assert len(metrics["ratings"]) == len(metrics["quality_ratings"]) == 12
    for metrics in whole[1:]:
        assert 0 <= metrics["held_out_accept_rate"] <= 1 and "kl_to_round_start" in metrics
        assert 0 <= metrics["held_out_mean_reward"] <= 1
    round_two = tmp_path / "whole" / "round-002"
    assert load_pipeline(round_two / "generator").unet.__class__.__name__ == "UNet2DModel"  # LoRA merged
    ratings = RatingsFile(round_two / "ratings.jsonl").ratings()
    assert len(ratings) == 48 and {r.rater for r in ratings} == {"tests.test_train_rlhf:class_rater"}
    with np.load(round_two / "pool.npz") as pool:
        pixels, captions = pool["images"], [str(c) for c in pool["captions"]]
    expected = class_rater(torch.from_numpy(pixels).float()[:, None] / 255, captions)
    by_image = {(r.image, r.aspect): r.rating for r in ratings}
    for aspect in Aspect:  # each aspect's rating recorded as the rater gave it
        assert [by_image[image_digest(p), aspect] for p in pixels] == expected[aspect.value]
    # the policy continues from the last round's, in two stages; stage 2 learns from the accepted images only
    stage2 = json.loads((round_two / "policy" / "policy.json").read_text())
    assert stage2["stage"] == 2 and stage2["train_samples"] < json.loads(
        (round_two / "policy-stage1" / "policy.json").read_text())["train_samples"]
    assert AlignmentPolicy.from_pretrained(round_two / "policy").tokenizer.vocab == AlignmentPolicy.from_pretrained(
        tmp_path / "whole" / "round-001" / "policy").tokenizer.vocab
    saved = json.loads((tmp_path / "whole" / "rounds.json").read_text())
    assert without_timing(saved["rounds"]) == without_timing(whole)

    # A run stopped after round 1, then one killed in round 2 after its selector, each started again.
    resumed = tmp_path / "resumed"
    train_rlhf.main(rlhf_args(generator_folder, resumed, "--rounds", "1", *rater))
    train_rlhf.main(rlhf_args(generator_folder, resumed, "--rounds", "2", *rater))
    shutil.rmtree(resumed / "round-002" / "generator")
    (resumed / "round-002" / "metrics.json").unlink()
    (resumed / "round-002" / "generator.partial").mkdir()  # what a kill during the save leaves
    torch.manual_seed(12345)  # a fresh process's global generator is not where the killed one's was
    again = train_rlhf.main(rlhf_args(generator_folder, resumed, "--rounds", "2", *rater))
    assert without_timing(again) == without_timing(whole)
    assert len(RatingsFile(resumed / "round-002" / "ratings.jsonl").ratings()) == 48  # nothing rated twice


def test_a_round_stops_before_the_update_when_a_reward_model_does_not_rank(generator_folder, tmp_path):
    rater = ["--rater", "tests.test_train_rlhf:class_rater"]
    with pytest.raises(train_rlhf.RewardModelError, match="selector's held-out Spearman correlation with the "
                                                          "quality ratings is .* under --min_reward_spearman 1.01"):
        train_rlhf.main(rlhf_args(generator_folder, tmp_path, "--rounds", "1", "--min_reward_spearman", "1.01", *rater))
    round_one = tmp_path / "round-001"
    assert (round_one / "selector").is_dir() and not (round_one / "generator").exists()
    trained = (round_one / "selector" / "model.safetensors").stat().st_mtime_ns
    # going on anyway keeps the selector it trained
    history = train_rlhf.main(rlhf_args(generator_folder, tmp_path, "--rounds", "1", *rater))
    assert [m["round"] for m in history] == [0, 1]
    assert (round_one / "selector" / "model.safetensors").stat().st_mtime_ns == trained


def test_a_trained_classifier_starts_the_selector_open_clip_the_policy_and_later_rounds_continue_them(
        generator_folder, tmp_path):
    from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

    from .test_clip_metrics import save_tiny_clip

    ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                              layer_type="basic", num_labels=2)).save_pretrained(tmp_path / "expert")
    save_tiny_clip(tmp_path / "clip")
    history = train_rlhf.main(rlhf_args(generator_folder, tmp_path / "run", "--rounds", "2",
                                        "--selector_image_encoder", str(tmp_path / "expert"),
                                        "--policy_clip_model", str(tmp_path / "clip"),
                                        "--rater", "tests.test_train_rlhf:class_rater"))
    assert [m["round"] for m in history] == [0, 1, 2]
    rounds = [tmp_path / "run" / f"round-00{r}" for r in (1, 2)]
    first, second = (AutoModelForImageClassification.from_pretrained(r / "selector") for r in rounds)
    assert type(first).__name__ == type(second).__name__ == "ResNetForImageClassification"
    assert first.config.num_labels == second.config.num_labels == 1
    for folder in rounds:
        for stage in ("policy-stage1", "policy"):
            assert type(AlignmentPolicy.from_pretrained(folder / stage)).__name__ == "ClipAlignmentPolicy"
    assert 0 <= history[-1]["held_out_accept_rate"] <= 1
    with pytest.raises(SystemExit):
        rlhf_args(generator_folder, tmp_path / "x", "--policy_clip_model", str(tmp_path / "clip"),
                  "--policy_image_encoder", str(tmp_path / "expert"))


@pytest.mark.parametrize("tune", ["lora", "class_embeddings"])
def test_the_pools_own_ratings_as_the_reward_need_no_reward_model(generator_folder, tmp_path, tune):
    history = train_rlhf.main(rlhf_args(generator_folder, tmp_path, "--rounds", "1", "--reward", "ratings",
                                        "--update", "reward_weighted", "--pretrain_weight", "0", "--tune", tune,
                                        "--rater", "tests.test_train_rlhf:class_rater"))
    round_one = tmp_path / "round-001"
    assert (round_one / "generator").is_dir()
    start = load_pipeline(generator_folder).unet.state_dict()
    tuned = load_pipeline(round_one / "generator").unet.state_dict()
    changed = {k for k in start if not torch.equal(start[k], tuned[k])}
    assert not (round_one / "selector").exists() and not (round_one / "policy").exists()
    with np.load(round_one / "pool.npz") as pool:
        pixels, captions = pool["images"], [str(c) for c in pool["captions"]]
    given = class_rater(torch.from_numpy(pixels).float()[:, None] / 255, captions)
    expected = [(q - 1) / 2 * (m - 1) / 2 for q, m in zip(given["quality"], given["prompt_match"])]
    if tune == "class_embeddings":  # only rows of classes with accepted images move, never the null row
        assert changed == {"class_embedding.weight"}
        rows = (start["class_embedding.weight"] != tuned["class_embedding.weight"]).any(1).tolist()
        accepted = {caption for caption, e in zip(captions, expected) if e == 1}
        assert any(rows) and not rows[-1]
        assert all(name in accepted for name, moved in zip(("dark", "bright"), rows) if moved)
    else:
        assert len(changed) > 1
    assert history[1]["pool_mean_reward"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert history[1]["pool_accept_rate"] == pytest.approx(np.mean([e == 1 for e in expected]))
    assert "held_out_mean_reward" not in history[1] and "mean_rating" in history[1]


def test_without_a_rater_a_round_waits_for_people(generator_folder, tmp_path, caplog):
    history = train_rlhf.main(rlhf_args(generator_folder, tmp_path, "--rounds", "1"))
    assert [m["round"] for m in history] == [0] and "mean_rating" not in history[0]
    pool = tmp_path / "round-001" / "pool.npz"
    assert "medsyn rate --images" in caplog.text and str(pool) in caplog.text
    with np.load(pool) as data:
        images, captions = data["images"], list(data["captions"])
    ratings = RatingsFile(tmp_path / "round-001" / "ratings.jsonl")
    for pixels, caption in zip(images, captions):
        ratings.append(Rating(image_digest(pixels), str(caption), 3 if pixels.mean() > 140 else 1, "dr-a"))
    caplog.clear()
    history = train_rlhf.main(rlhf_args(generator_folder, tmp_path, "--rounds", "1"))
    # the quality ratings are in; the policy of the default product reward needs the prompt-match ones too
    assert [m["round"] for m in history] == [0] and f"{len(images)} for prompt_match" in caplog.text
    for pixels, caption in zip(images, captions):
        match = 3 if (pixels.mean() > 127) == ("bright" in str(caption)) else 1
        ratings.append(Rating(image_digest(pixels), str(caption), match, "dr-b", Aspect.PROMPT_MATCH))
    history = train_rlhf.main(rlhf_args(generator_folder, tmp_path, "--rounds", "1"))
    assert [m["round"] for m in history] == [0, 1] and (tmp_path / "round-001" / "generator").is_dir()
    assert (tmp_path / "round-001" / "policy").is_dir()


def test_bad_arguments_are_named(generator_folder, tmp_path):
    with pytest.raises(SystemExit):
        rlhf_args(generator_folder, tmp_path, "--rater", "a:b", "--stand_in_rater", "expert")
    with pytest.raises(SystemExit):
        rlhf_args(generator_folder, tmp_path, "--update", "reward_weighted")
    with pytest.raises(SystemExit):  # every weight is --tune all now
        rlhf_args(generator_folder, tmp_path, "--lora_rank", "0")
    real = tmp_path / "real.npz"
    np.savez(real, images=np.zeros((4, 16, 16), np.uint8), labels=np.zeros(4, int), class_names=np.array(["x", "y"]))
    with pytest.raises(ValueError, match="has classes"):
        train_rlhf.main(rlhf_args(generator_folder, tmp_path / "out", "--real_images", str(real)))
    with pytest.raises(ValueError, match="module:function|cannot import"):
        train_rlhf.main(rlhf_args(generator_folder, tmp_path / "out", "--rater", "no_such_module_x:f"))


def test_a_medisyn_round_with_reward_weighted_fine_tuning_and_real_images(tmp_path):
    """A text-guided generator: its prompts play the classes; real images mix in under the prompt naming their
    class; the round's generator is a MediSyn folder again."""
    from .conftest import DUMMY_CAPTIONS, get_dummy_medisyn_pipeline

    get_dummy_medisyn_pipeline().save_pretrained(tmp_path / "medisyn")
    prompts = DUMMY_CAPTIONS[:2]  # "... healthy", "... glioma ..."
    real = tmp_path / "real.npz"
    np.savez(real, images=np.random.default_rng(0).integers(0, 255, (8, 16, 16), dtype=np.uint8),
             labels=np.arange(8) % 2, class_names=np.array(["glioma", "healthy"]))
    history = train_rlhf.main(rlhf_args(
        str(tmp_path / "medisyn"), tmp_path / "out", "--prompts", *prompts, "--rounds", "1", "--update",
        "reward_weighted", "--real_images", str(real), "--rater", "tests.test_train_rlhf:brightness_rater"))
    assert [m["round"] for m in history] == [0, 1]
    assert set(history[1]["mean_rating_per_class"]) == set(prompts) and "frechet_distance" in history[1]
    assert type(load_pipeline(tmp_path / "out" / "round-001" / "generator")).__name__ == "MediSynPipeline"

    with pytest.raises(ValueError, match="--tune class_embeddings needs a unet with a class-embedding table"):
        train_rlhf.main(rlhf_args(str(tmp_path / "medisyn"), tmp_path / "other", "--prompts", *prompts,
                                  "--tune", "class_embeddings", "--rater", "tests.test_train_rlhf:brightness_rater"))
    assert not (tmp_path / "other").exists()  # refused before the first round
    with pytest.raises(ValueError, match="give its --prompts"):
        train_rlhf.main(rlhf_args(str(tmp_path / "medisyn"), tmp_path / "other", "--pretrain_weight", "0"))
    np.savez(real, images=np.zeros((2, 16, 16), np.uint8), labels=np.arange(2),
             class_names=np.array(["cataract", "healthy"]))
    with pytest.raises(ValueError, match="'cataract' is named by 0 of the prompts"):
        train_rlhf.main(rlhf_args(str(tmp_path / "medisyn"), tmp_path / "other", "--prompts", *prompts,
                                  "--real_images", str(real)))


@pytest.mark.slow
def test_two_processes_run_the_round_one_process_runs(generator_folder, tmp_path):
    """``accelerate launch`` with 2 gloo ranks: the same pool (each rank samples half), rated once, and an update
    whose every step averages the ranks' halves of the minibatch, so it ends where one process's does; then a round
    with the reward models, trained data-parallel by their scripts."""
    from .ddp_launch import run_two_ranks

    rater = ["--rater", "tests.test_train_rlhf:class_rater"]
    # every stochastic step in every update: the update is then deterministic given the pool
    exact = ["--rounds", "1", "--reward", "ratings", "--update", "policy_gradient", *rater]
    one = train_rlhf.main(rlhf_args(generator_folder, tmp_path / "one", *exact))
    run_two_ranks(tmp_path, "medsyn.train_scripts.train_rlhf", rlhf_argv(generator_folder, tmp_path / "two", *exact))
    two = json.loads((tmp_path / "two" / "rounds.json").read_text())["rounds"]
    round_one = [tmp_path / run / "round-001" for run in ("one", "two")]
    pools = [np.load(folder / "pool.npz") for folder in round_one]
    assert np.array_equal(pools[0]["labels"], pools[1]["labels"])
    # the same chains; float sums in another batch shape move a pixel by at most one grey level
    assert np.abs(pools[0]["images"].astype(int) - pools[1]["images"].astype(int)).max() <= 1
    assert len(RatingsFile(round_one[1] / "ratings.jsonl").ratings()) == 2 * 24  # rated once, not once per rank
    start = load_pipeline(generator_folder).unet.state_dict()
    ends = [load_pipeline(folder / "generator").unet.state_dict() for folder in round_one]
    moved = sum((ends[0][k] - start[k]).pow(2).sum() for k in start).sqrt()
    apart = sum((ends[1][k] - ends[0][k]).pow(2).sum() for k in start).sqrt()
    assert moved > 0 and apart < 0.05 * moved, (float(apart), float(moved))
    assert [m["round"] for m in two] == [0, 1]
    assert two[1]["kl_to_round_start"] == pytest.approx(one[1]["kl_to_round_start"], rel=0.05)

    run_two_ranks(tmp_path, "medsyn.train_scripts.train_rlhf",
                  rlhf_argv(generator_folder, tmp_path / "models", "--rounds", "1", *rater))
    round_one = tmp_path / "models" / "round-001"
    for saved in ("selector", "policy-stage1", "policy", "generator"):
        assert (round_one / saved).is_dir() and not (round_one / f"{saved}.partial").exists()
    assert len(RatingsFile(round_one / "ratings.jsonl").ratings()) == 2 * 24
    assert json.loads((tmp_path / "models" / "rounds.json").read_text())["rounds"][1]["held_out_accept_rate"] >= 0
