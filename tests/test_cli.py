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
