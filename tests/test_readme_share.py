"""README's "Share your model": its commands and snippets, run as written on tiny models (train, generate,
evaluate into the card, push to a loopback Hub, load with and without medsyn: the same images)."""

from __future__ import annotations

import fnmatch
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from huggingface_hub import ModelCard

from medsyn.cli import main as cli
from medsyn.data import SimulatedBrainMRI

from .fake_hub import FakeHub
from .test_hub_sharing import BLOCK_MEDSYN
from .test_train_score_langevin import TINY

README = Path(__file__).resolve().parents[1] / "README.md"
#: What each command gets on top of the README's flags, to run in seconds.
FAST = {
    "train": TINY + ["--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_steps", "1"],
    "generate": ["--num-inference-steps", "2", "--n-steps-each", "1"],
    "evaluate": ["--no-inception", "--no-downstream", "--diversity-pairs", "20"],
}


def section_blocks(language: str) -> list[str]:
    text = README.read_text().split("## Share your model", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def commands() -> list[list[str]]:
    (block,) = section_blocks("bash")
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def upload_as_the_hub_would(hub_root: Path):
    def upload_folder(repo_id, folder_path, ignore_patterns, **kwargs):
        target = hub_root / repo_id
        shutil.rmtree(target, ignore_errors=True)
        for file in Path(folder_path).rglob("*"):
            relative = file.relative_to(folder_path).as_posix()
            if file.is_file() and not any(fnmatch.fnmatch(relative, p) for p in ignore_patterns):
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, target / relative)
    return upload_folder


def test_share_your_model_as_the_readme_says(tmp_path, monkeypatch):
    import medsyn.hub_upload as hub_upload

    monkeypatch.chdir(tmp_path)
    for name, seed in (("brain_mri_train.npz", 0), ("brain_mri_test.npz", 1)):
        data = SimulatedBrainMRI(resolution=16, seed=seed).generate(24)
        np.savez(name, images=data["images"], labels=data["labels"], class_names=np.array(["healthy", "tumor"]))

    class Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    monkeypatch.setattr(hub_upload, "create_repo", lambda repo_id, **kwargs: Repo(repo_id))
    monkeypatch.setattr(hub_upload, "upload_folder", upload_as_the_hub_would(tmp_path / "hub"))
    for command in commands():
        if command[:2] == ["accelerate", "launch"]:
            script = importlib.import_module("medsyn." + command[2].removesuffix(".py").replace("/", "."))
            script.main(script.parse_args(command[3:] + FAST["train"]))
        else:
            assert command[0] == "medsyn", command
            assert cli(command[1:] + FAST.get(command[1], [])) == 0, command

    card = ModelCard.load(tmp_path / "hub" / "your-name" / "brain-score" / "README.md")
    assert 'from_pretrained("your-name/brain-score")' in card.text
    assert "| memorisation audit (structure)" in card.text and "Not measured yet" not in card.text
    uploaded = sorted(p.name for p in (tmp_path / "hub" / "your-name" / "brain-score").iterdir())
    assert "pipeline_score_langevin.py" in uploaded and not any(n.startswith(("checkpoint-", "logs")) for n in uploaded)
    assert (tmp_path / "brain-score" / "checkpoint-2").is_dir()  # kept locally

    with_medsyn, without_medsyn = section_blocks("python")
    with FakeHub({"your-name/brain-score": tmp_path / "hub" / "your-name" / "brain-score"}) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "cache"),
               "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
        for name, code in (("with", with_medsyn), ("without", BLOCK_MEDSYN + without_medsyn)):
            code += f"\nimport numpy as np\nnp.save({name!r} + '.npy', np.stack([np.asarray(i) for i in images]))\n"
            result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                                    text=True, timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "with.npy"), np.load(tmp_path / "without.npy"))
