"""Model cards a Hub reviewer accepts, `medsyn push`, and `pipe.push_to_hub` keeping medsyn's card."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from medsyn.cli import main as cli
from medsyn.model_card import add_evaluation_to_model_card, card_metadata, hub_id
from medsyn.pipelines import ScoreLangevinPipeline
from medsyn.train_scripts.train_score_langevin import main, parse_args

from .test_train_score_langevin import TINY

SECTIONS = ["## How to use", "## Training", "## Limitations", "## Evaluation (medsyn evaluate)", "## Intended uses",
            "## Out-of-scope uses", "## Bias, risks and limitations", "## License", "## Citation"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cards") / "brain-score"
    main(parse_args(TINY + ["--output_dir", str(folder), "--class_conditional", "--max_train_steps", "1",
                            "--checkpointing_steps", "1", "--validation_steps", "100"]))
    return folder


def test_a_trained_model_card_has_hub_metadata_and_the_sections_reviewers_ask_for(trained):
    card = ModelCard.load(trained / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "other" and data["license_name"] and data["license_link"]
    # Class-conditional: no Hub task claims the labels do nothing.
    assert data["library_name"] == "diffusers" and "pipeline_tag" not in data
    assert {"medsyn", "medical-imaging", "synthetic-data", "diffusers", "ncsn",
            "class-conditional-image-generation"} <= set(data["tags"])
    assert data["inference"] is False and "base_model" not in data and "datasets" not in data
    positions = [card.text.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    assert 'from_pretrained("YOUR_HUB_USER/brain-score")' in card.text  # never the local path
    assert str(trained.parent) not in card.text
    assert 'DiffusionPipeline.from_pretrained("YOUR_HUB_USER/brain-score", trust_remote_code=True)' in card.text
    assert "medsyn generate --model YOUR_HUB_USER/brain-score --class-label healthy" in card.text
    assert "not for diagnosis" in card.text.lower() and "Song & Ermon" in card.text


def test_only_an_unconditional_pixel_model_is_tagged_unconditional():
    assert card_metadata("ddpm", "other", None, None).pipeline_tag == "unconditional-image-generation"
    conditional = card_metadata("ddpm", "other", None, None, class_conditional=True)
    assert conditional.pipeline_tag is None and "class-conditional-image-generation" in conditional.tags
    assert card_metadata("medisyn", "other", None, None, class_conditional=True).pipeline_tag == "text-to-image"


def test_the_card_reads_fid_only_against_a_real_reference_of_its_own_size():
    from medsyn.model_card import evaluation_markdown

    section = {"half_size_fid": 180.0, "real_halves_fid": 176.9, "half_size": 64, "fid": 108.8,
               "precision": 0.5, "recall": 0.5, "density": 1.0, "coverage": 0.5}
    metrics = {"inputs": {"generated": {"count": 128}, "real": {"count": 128}}, "inception": section,
               "domain": {"note": "skipped"}, "diversity": {"overall": {"generated": 0.5, "real": 0.4}},
               "privacy": {"note": "skipped"}}
    rows = evaluation_markdown(metrics).splitlines()
    same_size = next(row for row in rows if "176.9" in row)
    assert "180" in same_size and "64 images each" in same_size and "floor" not in same_size
    on_all = next(row for row in rows if "108.8" in row)
    assert "176.9" not in on_all and "not comparable" in on_all


def test_only_hub_ids_enter_the_metadata(tmp_path):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "base").mkdir()
    assert hub_id("org/medisyn-base") == "org/medisyn-base"
    for not_an_id in (str(tmp_path), "a/b/c", "imagefolder", "bad id/x", None):
        assert hub_id(not_an_id) is None
    data = card_metadata("medisyn_lora", "cc-by-4.0", base_model=str(tmp_path / "org" / "base"), dataset="imagefolder")
    assert data.base_model is None and data.datasets is None and data.license == "cc-by-4.0"
    data = card_metadata("medisyn_lora", "other", base_model="org/medisyn-base", dataset="org/brain-mri")
    assert data.base_model == "org/medisyn-base" and data.datasets == ["org/brain-mri"]
    assert "lora" in data.tags


def test_the_evaluation_replaces_its_placeholder_in_place(trained, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(trained, folder)
    metrics = {"inputs": {"generated": {"count": 4}, "real": {"count": 4}},
               "inception": {"note": "skipped"}, "domain": {"note": "skipped"},
               "diversity": {"overall": {"generated": 0.5, "real": 0.4}},
               "privacy": {"images": {"space": "structure", "num_generated": 4, "verdict": "pass", "num_near_copies": 0, "num_flagged": 0,
                                     "min_distance": 0.2, "data_copying_z": 1.0}}}
    text = add_evaluation_to_model_card(folder, metrics).read_text()
    assert "Not measured yet" not in text and "| memorisation audit (structure), 4 images | pass" in text
    assert text.index("## Evaluation") < text.index("## Intended uses")  # where the placeholder was
    assert ModelCard.load(folder / "README.md").data.license == "other"


def test_push_names_the_repo_in_the_card_and_leaves_run_files_local(trained, tmp_path, monkeypatch, capsys):
    import shutil

    import medsyn.hub_upload as hub_upload

    folder = tmp_path / "brain-score"
    shutil.copytree(trained, folder)
    calls = {}

    class Repo:
        repo_id = "hospital/brain-score"

    monkeypatch.setattr(hub_upload, "create_repo", lambda name, **kw: calls.setdefault("create", (name, kw)) and Repo)
    monkeypatch.setattr(hub_upload, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    assert cli(["push", str(folder), "--repo-id", "hospital/brain-score", "--private"]) == 0
    assert calls["create"] == ("hospital/brain-score", {"exist_ok": True, "token": None, "private": True})
    assert calls["upload"]["folder_path"] == folder and calls["upload"]["repo_id"] == "hospital/brain-score"
    assert {"checkpoint-*", ".staging-checkpoint-*", ".tmp-*", "logs/*", "validation/*"} <= set(
        calls["upload"]["ignore_patterns"])
    card = (folder / "README.md").read_text()
    assert "YOUR_HUB_USER" not in card and 'from_pretrained("hospital/brain-score")' in card
    assert (folder / "checkpoint-1").is_dir()  # the run's files stay where they are

    (folder / "README.md").write_text("---\nbase_model: /data/models/base\n---\n# x\n")
    assert cli(["push", str(folder), "--repo-id", "hospital/brain-score"]) == 2
    assert "not a Hub id" in capsys.readouterr().err
    (folder / "README.md").unlink()
    assert cli(["push", str(folder), "--repo-id", "hospital/brain-score"]) == 2
    assert "no model card" in capsys.readouterr().err
    assert cli(["push", str(tmp_path / "nope"), "--repo-id", "hospital/x"]) == 2


def test_pipe_push_to_hub_uploads_medsyns_card_not_diffusers_generic_one(trained, monkeypatch):
    import diffusers.utils.hub_utils as hub_utils

    uploaded = {}

    class Repo:
        repo_id = "hospital/brain-score"

    def upload_folder(repo_id, folder_path, **kwargs):
        uploaded["card"] = open(f"{folder_path}/README.md").read()
        uploaded["files"] = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())

    monkeypatch.setattr(hub_utils, "create_repo", lambda *a, **kw: Repo)
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda *a, **kw: ModelCard("generic"))
    monkeypatch.setattr(hub_utils, "upload_folder", upload_folder)
    pipe = ScoreLangevinPipeline.from_pretrained(trained)
    pipe.push_to_hub("hospital/brain-score")
    expected = (trained / "README.md").read_text().replace("YOUR_HUB_USER/brain-score", "hospital/brain-score")
    assert uploaded["card"] == expected
    assert "pipeline_score_langevin.py" in uploaded["files"]


def test_local_paths_are_named_by_their_last_part_only(tmp_path):
    import numpy as np

    from medsyn.data import SimulatedBrainMRI

    data = SimulatedBrainMRI(resolution=16, seed=0).generate(12)
    (tmp_path / "hospital" / "ward-7").mkdir(parents=True)
    path = tmp_path / "hospital" / "ward-7" / "mri.npz"
    np.savez(path, images=data["images"], labels=data["labels"], class_names=np.array(["healthy", "tumor"]))
    main(parse_args(TINY + ["--output_dir", str(tmp_path / "model"), "--train_data_dir", str(path),
                            "--max_train_steps", "1", "--checkpointing_steps", "100", "--validation_steps", "100"]))
    card = (tmp_path / "model" / "README.md").read_text()
    assert "`mri.npz` (local)" in card and "ward-7" not in card and str(tmp_path) not in card
