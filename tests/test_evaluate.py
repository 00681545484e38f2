"""``medsyn evaluate`` end to end on small simulated sets, and the image-set selection it reads."""

import json

import numpy as np
import pytest
from PIL import Image

from medsyn.cli import main
from medsyn.data import SimulatedBrainMRI
from medsyn.evaluation import load_image_set


def _save(path, images, labels=None, **extra):
    arrays = {"images": images, **extra}
    if labels is not None:
        arrays.update(labels=labels, class_names=np.array(["healthy", "tumor"]))
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    train = SimulatedBrainMRI(32, seed=1).generate(120)
    real = SimulatedBrainMRI(32, seed=2).generate(40)
    generated = SimulatedBrainMRI(32, seed=3).generate(40)
    images = generated["images"].copy()
    images[[4, 9]] = train["images"][[10, 20]]  # two planted copies of training images
    from transformers import ResNetConfig, ResNetModel

    encoder = ResNetModel(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    encoder.save_pretrained(root / "encoder")
    return {
        "train": _save(root / "train.npz", train["images"], train["labels"]),
        "real": _save(root / "real.npz", real["images"], real["labels"]),
        "generated": _save(root / "generated.npz", images, generated["labels"]),
        "encoder": str(root / "encoder"),
        "root": root,
    }


def test_selection_by_column_and_part(tmp_path):
    images = np.arange(10, dtype=np.uint8)[:, None, None].repeat(4, 1).repeat(4, 2)
    path = _save(tmp_path / "s.npz", images, labels=np.arange(10) % 2, split=np.array(["a", "b"] * 5))
    selected = load_image_set(f"{path}:split=b", "real")
    assert selected.images[:, 0, 0, 0].tolist() == [1, 3, 5, 7, 9] and selected.labels.tolist() == [1] * 5
    halves = [load_image_set(f"{path}:part={k}/2", "real").images[:, 0, 0, 0].tolist() for k in (1, 2)]
    assert sorted(halves[0] + halves[1]) == list(range(10)) and not set(halves[0]) & set(halves[1])
    both = load_image_set(f"{path}:split=a,part=2/2", "real")
    assert both.images[:, 0, 0, 0].tolist() == [2, 6]
    with pytest.raises(ValueError, match="no per-image array 'site'"):
        load_image_set(f"{path}:site=x", "real")
    with pytest.raises(ValueError, match="selection is empty"):
        load_image_set(f"{path}:split=c", "real")
    with pytest.raises(ValueError, match="part must be K/N"):
        load_image_set(f"{path}:part=half", "real")


def test_folder_sets_load_with_their_class_folders(tmp_path):
    for label in ("healthy", "tumor"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.fromarray(np.full((8, 8), i * 50, dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    image_set = load_image_set(str(tmp_path), "generated")
    assert image_set.images.shape == (4, 1, 8, 8) and image_set.class_names == ["healthy", "tumor"]


def test_evaluate_writes_metrics_and_a_self_contained_report(sets, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--real", sets["real"], "--generated", sets["generated"], "--train", sets["train"],
                 "--domain-encoder", sets["encoder"], "--no-inception", "--output-dir", str(out),
                 "--diversity-pairs", "50", "--audit-threshold", "0.01", "--test", sets["real"],
                 "--downstream-steps", "20"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    counts = np.bincount(np.load(sets["generated"])["labels"], minlength=2)
    assert metrics["inputs"]["generated"]["per_class"] == {"healthy": counts[0], "tumor": counts[1]}
    assert metrics["inception"] == {"note": "not computed: --no-inception"}
    domain = metrics["domain"]
    assert 0 <= domain["precision"] <= 1 and 0 <= domain["recall"] <= 1 and domain["fid"] >= 0
    # The planted copies are at relative structural distance 0; different simulated slices are not close.
    pixel = metrics["privacy"]["images"]
    assert not pixel["passed"] and sorted(pixel["flagged_indices"]) == [4, 9] and pixel["min_distance"] == 0
    assert sorted(pixel["near_copy_indices"]) == [4, 9] and pixel["verdict"].startswith("failed: 2 generated")
    from medsyn.model_card import evaluation_markdown

    assert "| memorisation audit (structure), 40 images | failed: 2 generated images" in evaluation_markdown(metrics)
    assert sorted(metrics["flagged_pair_images"]) == [
        "flagged/flagged_000004_train_000010.png", "flagged/flagged_000009_train_000020.png"]
    assert set(metrics["diversity"]["per_class"]) == {"healthy", "tumor"}
    assert metrics["image_statistics"]["snr"]["real"]["mean"] > 1
    downstream = metrics["downstream"]
    assert set(downstream["runs"]) == {"real", "real + synthetic"} and "20 steps" in downstream["description"]
    assert downstream["runs"]["real + synthetic"]["train_images"] == 160
    page = (out / "report.html").read_text()
    assert "AUC change from adding synthetic images" in page
    assert "Privacy: memorisation audit" in page and "failed: 2 generated images are copies" in page
    assert "data:image/png;base64," in page and "src=\"http" not in page  # images inline, nothing fetched


def test_same_distribution_scores_as_such_and_files_are_protected(sets, tmp_path, capsys):
    out = tmp_path / "eval"
    real = sets["real"]
    assert main(["evaluate", "--real", f"{real}:part=1/2", "--generated", f"{real}:part=2/2", "--no-inception",
                 "--domain-encoder", sets["encoder"], "--output-dir", str(out), "--diversity-pairs", "20"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["privacy"] == {"note": "not run: pass --train (the images the model was trained on)"}
    diversity = metrics["diversity"]["overall"]
    assert diversity["generated"] == pytest.approx(diversity["real"], abs=0.1)
    before = (out / "metrics.json").read_bytes()
    assert main(["evaluate", "--real", real, "--generated", real, "--no-inception", "--output-dir", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "metrics.json").read_bytes() == before


def test_mismatched_sets_get_a_clear_error(sets, tmp_path, capsys):
    rgb = _save(tmp_path / "rgb.npz", np.zeros((5, 32, 32, 3), dtype=np.uint8))
    assert main(["evaluate", "--real", sets["real"], "--generated", rgb, "--no-inception",
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "differ in (channels, height, width)" in capsys.readouterr().err
    bad = tmp_path / "nan.npz"
    np.savez(bad, images=np.full((3, 32, 32), np.nan, dtype=np.float32))
    assert main(["evaluate", "--real", sets["real"], "--generated", str(bad), "--no-inception",
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "NaN" in capsys.readouterr().err


def test_max_images_samples_the_metrics_but_the_audit_sees_every_generated_image(sets, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--real", sets["real"], "--generated", sets["generated"], "--train", sets["train"],
                 "--no-inception", "--no-downstream", "--max-images", "5", "--diversity-pairs", "5",
                 "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inputs"]["generated"]["count"] == 5 and metrics["inputs"]["generated"]["audited"] == 40
    pixel = metrics["privacy"]["images"]
    assert pixel["num_generated"] == 40 and pixel["held_out_used"] == 40 and pixel["near_copy_indices"] == [4, 9]


def test_held_out_images_leaked_from_training_are_left_out_of_both_calibrations(sets, tmp_path):
    train, real = np.load(sets["train"]), np.load(sets["real"])
    leaky = _save(tmp_path / "leaky.npz", np.concatenate([real["images"][:30], train["images"][:10]]),
                  np.concatenate([real["labels"][:30], train["labels"][:10]]))
    out = tmp_path / "eval"
    with pytest.warns(UserWarning, match="10 of 40 images are near-copies"):
        assert main(["evaluate", "--real", leaky, "--generated", sets["generated"], "--train", sets["train"],
                     "--no-inception", "--no-downstream", "--domain-encoder", sets["encoder"],
                     "--diversity-pairs", "5", "--output-dir", str(out)]) == 0
    privacy = json.loads((out / "metrics.json").read_text())["privacy"]
    assert privacy["images"]["held_out_excluded_indices"] == list(range(30, 40))
    assert privacy["images"]["held_out_used"] == privacy["domain_features"]["held_out_used"] == 30


def test_own_data_path_train_at_a_lower_resolution_generate_evaluate(tmp_path):
    """The README's own-data path on a 128 px set trained at 16 px: train on one part of the file (the training
    scripts read evaluate's PATH:part=K/N), generate, evaluate against the other part. The real sets are resized
    to the model's 16 px as the training scripts resize, and the downstream section runs (--test defaults to
    --real)."""
    from medsyn.train_scripts import train_score_langevin

    data = SimulatedBrainMRI(128, seed=4).generate(48)
    path = _save(tmp_path / "scans.npz", data["images"], data["labels"])
    train_score_langevin.main(train_score_langevin.parse_args([
        "--train_data_dir", f"{path}:part=1/2", "--resolution", "16", "--class_conditional", "--base_channels", "8",
        "--channel_mult", "1", "2", "--layers_per_block", "1", "--norm_num_groups", "4", "--train_batch_size", "4",
        "--num_noise_levels", "4", "--n_steps_each", "1", "--max_train_steps", "2", "--num_validation_images", "1",
        "--report_to", "none", "--output_dir", str(tmp_path / "model")]))
    card = (tmp_path / "model" / "README.md").read_text()
    assert "| training images | 24 |" in card and "part=1/2" in card
    assert main(["generate", "--model", str(tmp_path / "model"), "--class-label", "tumor", "--num-images", "24",
                 "--format", "npz", "--output-dir", str(tmp_path / "out")]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--real", f"{path}:part=2/2", "--train", f"{path}:part=1/2", "--generated",
                 str(tmp_path / "out" / "samples.npz"), "--no-inception", "--diversity-pairs", "10",
                 "--downstream-steps", "5", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resized"] == ["--real resized from (128, 128) to (16, 16) as the training scripts resize",
                                  "--train resized from (128, 128) to (16, 16) as the training scripts resize"]
    assert metrics["inputs"]["real"]["shape"] == [1, 16, 16]
    assert "note" not in metrics["downstream"], metrics["downstream"]
