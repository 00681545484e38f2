"""diffusers' data conventions: an HF imagefolder with metadata captions, --dataset_name imagefolder / save_to_disk,
--caption_column defaulting to ``text`` (``caption`` accepted), and a missing caption column as an error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medsyn.train_scripts.train_medisyn import main, parse_args
from medsyn.training.script_args import load_training_data

from .test_train_medisyn import TINY_MODEL, TINY_RUN

CAPTIONS = ["axial T1 brain MRI, healthy", "axial T1 brain MRI, glioma", "axial T2 brain MRI, healthy",
            "axial T2 brain MRI, meningioma"]


def write_imagefolder(root, column="text", split="train"):
    folder = root / split if split else root
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as handle:
        for i, caption in enumerate(CAPTIONS * 2):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
            handle.write(json.dumps({"file_name": f"{i}.png", column: caption}) + "\n")
    return root


def args_for(*flags):
    return parse_args(["--vae_model_name_or_path", "unused", *flags])


@pytest.mark.parametrize("split", ["train", None])
def test_an_imagefolder_with_metadata_trains_on_its_captions(tmp_path, split):
    root = write_imagefolder(tmp_path / "data", split=split)
    dataset, description = load_training_data(args_for("--train_data_dir", str(root)), caption_column="text")
    assert sorted(dataset["caption"]) == sorted(CAPTIONS * 2)  # not "medical image, train" for every image
    assert "imagefolder" in description
    named, _ = load_training_data(args_for("--dataset_name", "imagefolder", "--train_data_dir", str(root)),
                                  caption_column="text")
    assert named["caption"] == dataset["caption"]


def test_caption_column_defaults_to_text_and_accepts_caption(tmp_path):
    assert args_for().caption_column == "text"
    root = write_imagefolder(tmp_path / "data", column="caption")
    dataset, _ = load_training_data(args_for("--train_data_dir", str(root)), caption_column="text")
    assert sorted(dataset["caption"]) == sorted(CAPTIONS * 2)
    with pytest.raises(ValueError, match="--caption_column 'findings' is not a column"):
        load_training_data(args_for("--train_data_dir", str(root)), caption_column="findings")


def test_a_save_to_disk_dataset_dict_trains_on_its_train_split(tmp_path):
    import datasets

    images = [Image.fromarray(np.full((16, 16), 40 * i, np.uint8)) for i in range(4)]
    train = datasets.Dataset.from_dict({"img": images, "report": CAPTIONS})
    test = datasets.Dataset.from_dict({"img": images[:1], "report": ["held out"]})
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "saved"))
    dataset, _ = load_training_data(
        args_for("--dataset_name", str(tmp_path / "saved"), "--image_column", "img", "--caption_column", "report"),
        caption_column="report")
    assert dataset["caption"] == CAPTIONS and len(dataset) == 4


def test_dataset_flags_are_checked_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        args_for("--dataset_name", "imagefolder")
    assert "reads the folder given by --train_data_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        args_for("--dataset_name", "org/set", "--train_data_dir", str(tmp_path))


def test_medisyn_trains_on_an_imagefolder(vae_path, tmp_path):
    root = write_imagefolder(tmp_path / "data")
    main(parse_args([*TINY_MODEL, *TINY_RUN, "--vae_model_name_or_path", vae_path, "--train_data_dir", str(root),
                     "--max_train_steps", "1", "--output_dir", str(tmp_path / "out")]))
    card = (tmp_path / "out" / "README.md").read_text()
    assert any(f"Rows: {caption}." in card for caption in CAPTIONS)  # the validation prompt is a metadata caption
    assert "medical image, train" not in card
