"""benchmarks/bench_feature_alignment.py: every stage of the hour-long grid resumes. A finished classifier or model is
read back, a training run cut after a checkpoint goes on from it to the same weights, and a stored evaluation is
reused only for the same judge and settings."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

SPEC = importlib.util.spec_from_file_location(
    "bench_feature_alignment", Path(__file__).parents[1] / "benchmarks" / "bench_feature_alignment.py")
bench = sys.modules["bench_feature_alignment"] = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)
# this test's own copy of the module samples with 4 noise levels x 1 step, not the demo's 40 x 6: same code paths
bench.SCORE_RECIPE = [*bench.SCORE_RECIPE, "--num_noise_levels", "4", "--n_steps_each", "1"]


def bench_args(folder: Path, *extra: str) -> list[str]:
    return ["--data", str(folder / "data.npz"), "--output-dir", str(folder / "out"), "--resolution", "16",
            "--expert-steps", "4", "--train-steps", "4", "--checkpoint-every", "2", "--per-class", "1",
            "--eval-seeds", "0", "--overhead-repeats", "0", *extra]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One whole run on two classes of flat 16 px images (dark, bright): expert, judge, two models, evaluations."""
    folder = tmp_path_factory.mktemp("alignment")
    rng = np.random.default_rng(0)
    labels = np.arange(32) % 2
    images = (np.where(labels, 200, 40)[:, None, None] + rng.integers(0, 30, (32, 16, 16))).astype(np.uint8)
    np.savez(folder / "data.npz", images=images, labels=labels, class_names=np.array(["dark", "bright"]))
    bench.main(bench_args(folder))
    return folder


def refuse(*_, **__):
    raise AssertionError("this stage was stored and must be read back")


def test_a_second_run_reads_everything_back_and_re_judges_only_on_new_settings(first_run, monkeypatch):
    before = json.loads((first_run / "out" / "results.json").read_text())
    assert [run["resumed"] for run in before["runs"]["baseline"] + before["runs"]["aligned"]] == [False, False]
    monkeypatch.setattr(bench.train_expert, "main", refuse)
    monkeypatch.setattr(bench.train_score_langevin, "main", refuse)
    monkeypatch.setattr(bench, "generation_accuracy", refuse)
    bench.main(bench_args(first_run))
    after = json.loads((first_run / "out" / "results.json").read_text())
    assert after["runs"] == before["runs"] and after["paired"] == before["paired"]
    with pytest.raises(ValueError, match="trained for 4 steps, not --train-steps 6"):
        bench.main(bench_args(first_run, "--train-steps", "6"))  # never mixed with models of another length

    monkeypatch.undo()
    monkeypatch.setattr(bench.train_expert, "main", refuse)
    monkeypatch.setattr(bench.train_score_langevin, "main", refuse)
    judged = []
    real = bench.generation_accuracy
    monkeypatch.setattr(bench, "generation_accuracy", lambda *a, **k: judged.append(a[2]) or real(*a, **k))
    bench.main(bench_args(first_run, "--per-class", "2"))
    assert judged == [2, 2]  # both models judged again, at the new sample size
    stored = json.loads((first_run / "out" / "baseline-seed0" / bench.EVALUATION_FILE).read_text())
    assert stored["settings"]["per_class"] == 2 and sum(map(sum, stored["evaluation"]["confusion_matrix"])) == 4


def test_a_cut_training_run_resumes_from_its_checkpoint_to_the_same_weights(first_run, tmp_path, monkeypatch):
    shutil.copy(first_run / "data.npz", tmp_path)
    done = first_run / "out"
    for finished in ("expert", "judge", "aligned-seed0"):
        shutil.copytree(done / finished, tmp_path / "out" / finished)
    cut = tmp_path / "out" / "baseline-seed0"
    shutil.copytree(done / "baseline-seed0" / "checkpoint-2", cut / "checkpoint-2")  # killed after step 2
    losses = []
    real = bench.train_score_langevin.dsm_loss
    monkeypatch.setattr(bench.train_score_langevin, "dsm_loss", lambda *a: losses.append(1) or real(*a))
    monkeypatch.setattr(bench.train_expert, "main", refuse)
    bench.main(bench_args(tmp_path))
    assert len(losses) == 2  # steps 3 and 4 only
    resumed, whole = (load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
                      for folder in (cut, done / "baseline-seed0"))
    assert resumed.keys() == whole.keys() and all((resumed[k] == whole[k]).all() for k in whole)
    assert json.loads((cut / bench.TIMING_FILE).read_text())["resumed"] is True
