import json

import numpy as np
import pytest
from PIL import Image

from medsyn.cli import main

from .conftest import get_dummy_pipeline


@pytest.fixture
def model_dir(tmp_path):
    get_dummy_pipeline().save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_generate_png_is_split_invariant_and_protects_files(model_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(model_dir), "--class-label", "tumor", "--num-images", "5",
                 "--seed", "3", "--output-dir", str(out), "--batch-size", "2"]) == 0
    files = sorted(out.glob("tumor_3_*.png"))
    assert len(files) == 5 and Image.open(files[0]).mode == "L"
    # Image i depends only on (seed, i): a different batch size gives the same files.
    assert main(["generate", "--model", str(model_dir), "--class-label", "1", "--num-images", "3", "--seed", "3",
                 "--output-dir", str(tmp_path / "other"), "--batch-size", "3"]) == 0
    for name in ("000000", "000002"):
        a = np.asarray(Image.open(out / f"tumor_3_{name}.png"), dtype=int)
        b = np.asarray(Image.open(tmp_path / "other" / f"1_3_{name}.png"), dtype=int)
        assert np.abs(a - b).max() <= 1
    before = files[0].read_bytes()
    assert main(["generate", "--model", str(model_dir), "--class-label", "tumor", "--num-images", "5", "--seed", "3",
                 "--output-dir", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert files[0].read_bytes() == before


def test_generate_npz(model_dir, tmp_path):
    out = tmp_path / "npz"
    assert main(["generate", "--model", str(model_dir), "--class-label", "healthy", "--num-images", "3",
                 "--output-dir", str(out), "--format", "npz"]) == 0
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (3, 16, 16) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [0, 0, 0] and data["class_names"].tolist() == ["healthy", "tumor"]


def test_generate_unknown_label_is_a_clear_error(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(model_dir), "--class-label", "glioma", "--output-dir", str(tmp_path / "x")]) == 2
    assert "unknown class label 'glioma'" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), "--resolution", "16", "--max-train-steps", "2",
                 "--probe-images", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_steps"] == 2
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape == (2 * 128, 8 * 128)  # 16 px tiles shown at 128 px
    probe = summary["label_probe"]
    assert set(probe["class_agreement"]) == {"healthy", "tumor"}
    assert all(0 <= v <= 1 for v in probe["class_agreement"].values())
    # Two training steps make noise: farther from real images than real images are from each other.
    assert probe["frechet_distance"] > probe["real_frechet_distance"]
    assert (out / "model" / "README.md").is_file()
    assert main(["demo", "--output-dir", str(out)]) == 2  # never overwrites a finished demo silently


@pytest.fixture
def medisyn_dir(tmp_path):
    from .conftest import get_dummy_medisyn_pipeline

    get_dummy_medisyn_pipeline().save_pretrained(tmp_path / "medisyn")
    return tmp_path / "medisyn"


def test_generate_drives_a_medisyn_model_by_prompt_with_the_seed_rule(medisyn_dir, tmp_path):
    prompt = "axial T1 brain MRI, healthy"
    common = ["generate", "--model", str(medisyn_dir), "--prompt", prompt, "--num-inference-steps", "2",
              "--num-images", "3", "--seed", "5"]
    assert main([*common, "--output-dir", str(tmp_path / "a"), "--batch-size", "2"]) == 0
    assert main([*common, "--output-dir", str(tmp_path / "b"), "--batch-size", "3", "--format", "npz"]) == 0
    files = sorted((tmp_path / "a").glob("*.png"))
    assert [f.name for f in files] == [f"axial_T1_brain_MRI_healthy_5_{i:06d}.png" for i in range(3)]
    stacked = np.load(tmp_path / "b" / "samples.npz")
    assert stacked["captions"].tolist() == [prompt] * 3
    for i, file in enumerate(files):  # image i depends only on (seed, i)
        assert np.abs(np.asarray(Image.open(file), dtype=int) - stacked["images"][i].astype(int)).max() <= 1


def test_generate_says_which_option_fits_which_model(medisyn_dir, model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(medisyn_dir), "--output-dir", str(tmp_path / "x")]) == 2
    assert "pass --prompt" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "a", "--output-dir", str(tmp_path / "y")]) == 2
    assert "pass --class-label, not --prompt" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "z")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_evaluate_expert_with_a_missing_expert_is_one_line(tmp_path, capsys):
    assert main(["evaluate-expert", "--model", "m", "--expert", str(tmp_path / "nope"),
                 "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --expert") and "Traceback" not in err


def test_every_flag_has_help():
    from medsyn.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    missing = [f"{name} {action.option_strings[0]}" for name, sub in subcommands.items()
               for action in sub._actions if action.option_strings and action.dest != "help" and not action.help]
    assert missing == []


def test_an_interrupted_npz_run_resumes_from_its_finished_batches(tmp_path, monkeypatch):
    """--format npz keeps each batch as it is made: stopped after two batches and started again, the run samples
    only the rest and writes the NPZ an uninterrupted run writes (it once wrote nothing until the end)."""
    import medsyn.generation as generation

    model = tmp_path / "model"
    get_dummy_pipeline().save_pretrained(model)
    common = ["generate", "--model", str(model), "--class-label", "tumor", "--num-images", "7", "--batch-size", "2",
              "--num-inference-steps", "2", "--seed", "3", "--format", "npz"]
    assert main([*common, "--output-dir", str(tmp_path / "whole")]) == 0
    real_sample, calls = generation.sample_images, []

    def stopping(pipe, keys, settings, **kwargs):
        calls.append([key.index for key in keys])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user's Ctrl-C in the third batch
        return real_sample(pipe, keys, settings, **kwargs)

    monkeypatch.setattr(generation, "sample_images", stopping)
    with pytest.raises(KeyboardInterrupt):
        main([*common, "--output-dir", str(tmp_path / "resumed")])
    assert not (tmp_path / "resumed" / "samples.npz").exists()
    calls.clear()
    monkeypatch.setattr(generation, "sample_images", lambda *a, **k: (calls.append(1), real_sample(*a, **k))[1])
    assert main([*common, "--output-dir", str(tmp_path / "resumed")]) == 0
    assert len(calls) == 2  # images 4-5 and 6: the first two batches were kept
    whole, resumed = (np.load(tmp_path / name / "samples.npz") for name in ("whole", "resumed"))
    np.testing.assert_array_equal(whole["images"], resumed["images"])
    assert not list((tmp_path / "resumed").glob(".samples-*"))  # the chunks are gone once the NPZ is whole
