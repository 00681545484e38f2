"""Issue 11, data and inputs: wide-integer scans keep their contrast, names cannot escape the output folder,
numbers are checked (NaN, 0, 1.7 are errors, never defaults), and a failed write leaves no partial file."""

import errno

import numpy as np
import pytest
import torch
from PIL import Image

from medsyn.cli import main
from medsyn.data import load_image_dataset
from medsyn.evaluation import load_image_set
from medsyn.evaluation.downstream import bootstrap_aucs
from medsyn.output_files import safe_file_stem
from medsyn.pipelines import ScoreLangevinPipeline

from .conftest import get_dummy_medisyn_pipeline, get_dummy_pipeline


def twelve_bit_scans(count=4, size=16):
    rng = np.random.default_rng(0)
    return (rng.random((count, size, size)) * 4095).astype(np.uint16)


def test_twelve_bit_npz_keeps_its_contrast_in_the_loader_and_in_evaluate_alike(tmp_path):
    scans = twelve_bit_scans()
    np.savez(tmp_path / "scans.npz", images=scans)
    loaded = np.stack([np.asarray(image) for image in load_image_dataset(tmp_path / "scans.npz")["image"]])
    evaluated = load_image_set(str(tmp_path / "scans.npz"), "real").images[:, 0].numpy()
    assert loaded.max() == 255 and loaded.min() == 0  # was 0..15
    np.testing.assert_array_equal(loaded, evaluated)
    # the same scan as a 16-bit PNG becomes the same grey levels
    folder = tmp_path / "folder" / "scans"
    folder.mkdir(parents=True)
    Image.fromarray(scans[0]).save(folder / "a.png")
    png = np.asarray(load_image_dataset(tmp_path / "folder")["image"][0])
    np.testing.assert_array_equal(png, loaded[0])


@pytest.mark.parametrize("values", [np.full((3, 8, 8), 200.0), np.linspace(-1, 1, 192).reshape(3, 8, 8)])
def test_evaluate_rejects_float_ranges_the_loader_rejects(tmp_path, values):
    np.savez(tmp_path / "f.npz", images=values.astype(np.float32))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        load_image_set(str(tmp_path / "f.npz"), "generated")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        load_image_dataset(tmp_path / "f.npz")


def test_mixed_channels_error_names_the_script_flag(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a" / "g.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "c.png")
    with pytest.raises(ValueError, match="--num_channels"):
        load_image_dataset(tmp_path)


@pytest.mark.parametrize(("name", "stem"), [("../../escaped", "escaped"), ("sub/dir", "sub_dir"),
                                            ("glioma grade IV", "glioma_grade_IV"), ("/etc/passwd", "etc_passwd")])
def test_class_names_become_safe_file_names(tmp_path, name, stem):
    assert safe_file_stem(name) == stem
    pipe = ScoreLangevinPipeline(**{**get_dummy_pipeline().components, "class_names": [name, "tumor"]})
    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "deep" / "out"
    assert main(["generate", "--model", str(tmp_path / "model"), "--class-label", name, "--num-images", "2",
                 "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}_0_000000.png", f"{stem}_0_000001.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "model"]  # nothing written beside it


@pytest.mark.parametrize(("flag", "value"), [("--guidance-scale", "nan"), ("--guidance-scale", "-1"),
                                             ("--num-inference-steps", "0"), ("--n-steps-each", "0"),
                                             ("--num-images", "0"), ("--batch-size", "1.5")])
def test_generate_rejects_bad_numbers_before_writing(tmp_path, capsys, flag, value):
    get_dummy_pipeline().save_pretrained(tmp_path / "model")
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tmp_path / "model"), "--output-dir", str(tmp_path / "out"), flag, value])
    assert flag in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_evaluate_rejects_a_nan_threshold(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--real", "r.npz", "--generated", "g.npz", "--output-dir", str(tmp_path),
              "--audit-threshold", "nan"])
    assert "--audit-threshold" in capsys.readouterr().err


def test_pipelines_reject_what_used_to_become_a_default_or_garbage():
    pipe = get_dummy_pipeline()
    for kwargs, message in (({"guidance_scale": float("nan")}, "guidance_scale"),
                            ({"num_inference_steps": 0}, "num_inference_steps"),
                            ({"n_steps_each": 0}, "n_steps_each"), ({"step_size": 0.0}, "step_size"),
                            ({"class_labels": [1.7]}, "class label"), ({"class_labels": [True]}, "class label"),
                            ({"max_batch_size": 0}, "max_batch_size")):
        with pytest.raises(ValueError, match=message):
            pipe(**kwargs)
    assert pipe(class_labels=[1.0], num_inference_steps=2, output_type="pt").images.shape == (1, 1, 16, 16)
    medisyn = get_dummy_medisyn_pipeline()
    for kwargs, message in (({"num_inference_steps": 0}, "num_inference_steps"), ({"height": -16}, "height"),
                            ({"height": 0}, "height"), ({"guidance_scale": float("nan")}, "guidance_scale"),
                            ({"num_images_per_prompt": 0}, "num_images_per_prompt")):
        with pytest.raises(ValueError, match=message):
            medisyn("axial T1 brain MRI, healthy", **kwargs)


def test_a_full_disk_leaves_no_partial_file_and_says_so(tmp_path, capsys, monkeypatch):
    get_dummy_pipeline().save_pretrained(tmp_path / "model")
    original = Image.Image.save
    calls = []

    def fill_disk_on_second(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            with open(fp, "wb") as file:
                file.write(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fill_disk_on_second)
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tmp_path / "model"), "--num-images", "3", "--class-label", "tumor",
                 "--output-dir", str(out)]) == 2
    assert "no space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["tumor_0_000000.png"]  # whole, and nothing half-written
    monkeypatch.undo()
    # the next run is not blocked by a broken file: it only needs --overwrite for the one that is whole
    assert main(["generate", "--model", str(tmp_path / "model"), "--num-images", "3", "--class-label", "tumor",
                 "--output-dir", str(out), "--overwrite"]) == 0
    assert all(Image.open(p).size == (16, 16) for p in out.iterdir())


def test_an_unwritable_output_folder_fails_before_any_work(tmp_path, capsys):
    get_dummy_pipeline().save_pretrained(tmp_path / "model")
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "out"
    assert main(["generate", "--model", str(tmp_path / "model"), "--output-dir", str(out)]) == 2
    assert "error:" in capsys.readouterr().err


def test_bootstrap_stops_when_a_class_is_missing():
    labels = torch.tensor([0, 0, 0, 0])
    with pytest.raises(ValueError, match="no image of class"):
        bootstrap_aucs([torch.rand(4)], labels, num_labels=2, resamples=10, seed=0)
