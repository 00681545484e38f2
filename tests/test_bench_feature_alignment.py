"""benchmarks/bench_feature_alignment.py: every stage of the hour-long grid resumes. A finished classifier or model is
read back, a training run cut after a checkpoint goes on from it to the same weights, and a stored evaluation is
reused only for the same judge (by its weights) and settings, here or, through --records, after the disk is gone.
Its companion bench_alignment_strength.py is tested on the same run's expert and UNet."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

SPEC = importlib.util.spec_from_file_location(
    "bench_feature_alignment", Path(__file__).parents[1] / "benchmarks" / "bench_feature_alignment.py")
bench = sys.modules["bench_feature_alignment"] = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)
# this test's own copy of the module samples with 4 noise levels x 1 step, not the demo's 40 x 6: same code paths
bench.SCORE_RECIPE = [*bench.SCORE_RECIPE, "--num_noise_levels", "4", "--n_steps_each", "1"]
SPEC = importlib.util.spec_from_file_location(  # imports the SCORE_RECIPE above, so its UNet is the run's
    "bench_alignment_strength", Path(__file__).parents[1] / "benchmarks" / "bench_alignment_strength.py")
strength = sys.modules["bench_alignment_strength"] = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(strength)


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
    import medsyn.training.score_losses as score_losses

    real = score_losses.dsm_loss
    monkeypatch.setattr(score_losses, "dsm_loss", lambda *a: losses.append(1) or real(*a))
    monkeypatch.setattr(bench.train_expert, "main", refuse)
    bench.main(bench_args(tmp_path))
    assert len(losses) == 2  # steps 3 and 4 only
    resumed, whole = (load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
                      for folder in (cut, done / "baseline-seed0"))
    assert resumed.keys() == whole.keys() and all((resumed[k] == whole[k]).all() for k in whole)
    assert json.loads((cut / bench.TIMING_FILE).read_text())["resumed"] is True


def perturb_weights(folder: Path) -> None:
    """The same classifier, retrained to other weights (as another thread count or torch would give)."""
    file = folder / "model.safetensors"
    weights = load_file(file)
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1e-3
    save_file(weights, file)


def test_a_stored_evaluation_follows_the_judge_s_weights_not_its_path(first_run, tmp_path, monkeypatch):
    for place in ("before", "after"):
        shutil.copy(first_run / "data.npz", (tmp_path / place).mkdir() or tmp_path / place)
    shutil.copytree(first_run / "out", tmp_path / "before" / "out")
    monkeypatch.setattr(bench.train_score_langevin, "main", refuse)
    bench.main(bench_args(tmp_path / "before"))  # judged at these settings, if not yet
    shutil.move(tmp_path / "before" / "out", tmp_path / "after" / "out")  # the same judge, elsewhere
    judged = []
    real = bench.generation_accuracy
    monkeypatch.setattr(bench, "generation_accuracy", lambda *a, **k: judged.append(a[2]) or real(*a, **k))
    bench.main(bench_args(tmp_path / "after"))
    assert judged == []
    perturb_weights(tmp_path / "after" / "out" / "judge")  # retrained in place to other weights
    bench.main(bench_args(tmp_path / "after"))
    assert judged == [1, 1]


def test_records_carry_a_grid_over_a_wiped_disk_and_refuse_one_made_otherwise(first_run, tmp_path, monkeypatch):
    shutil.copy(first_run / "data.npz", tmp_path)
    records = tmp_path / "records"
    bench.main(bench_args(tmp_path, "--records", str(records)))
    before = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(p.name for p in records.iterdir()) == ["aligned-seed0.json", "baseline-seed0.json"]
    record = json.loads((records / "aligned-seed0.json").read_text())
    assert not list(records.glob("*.safetensors")) and record["recipe"]["train_steps"] == 4
    assert record["evaluation"] == before["runs"]["aligned"][0]["evaluation"]

    shutil.rmtree(tmp_path / "out")  # the scratch disk is wiped; expert and judge retrain to the same weights
    monkeypatch.setattr(bench.train_score_langevin, "main", refuse)
    monkeypatch.setattr(bench, "generation_accuracy", refuse)
    bench.main(bench_args(tmp_path, "--records", str(records)))
    after = json.loads((tmp_path / "out" / "results.json").read_text())
    assert after["paired"] == before["paired"]
    assert [run["evaluation"] for run in after["runs"]["baseline"]] == [
        run["evaluation"] for run in before["runs"]["baseline"]]

    with pytest.raises(ValueError, match=r"train_steps 4 \(here 6\)"):
        bench.main(bench_args(tmp_path, "--records", str(records), "--train-steps", "6"))
    per_image_sum = tmp_path / "per-image-sum"  # made while --align_weight was against the per-image DSM sum
    shutil.copytree(records, per_image_sum)
    legacy = json.loads((per_image_sum / "aligned-seed0.json").read_text())
    del legacy["recipe"]["align_weight_against"]
    (per_image_sum / "aligned-seed0.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="aligned-seed0.json was made otherwise.*align_weight_against None"):
        bench.main(bench_args(tmp_path, "--records", str(per_image_sum)))
    perturb_weights(tmp_path / "out" / "expert")
    with pytest.raises(ValueError, match="aligned-seed0.json was made otherwise.*expert_sha256"):
        bench.main(bench_args(tmp_path, "--records", str(records)))
    perturb_weights(tmp_path / "out" / "judge")
    with pytest.raises(ValueError, match="baseline-seed0.json was made otherwise.*judge_sha256"):
        bench.main(bench_args(tmp_path, "--records", str(records)))
    assert json.loads((records / "aligned-seed0.json").read_text()) == record  # nothing kept was overwritten


def test_each_model_is_recorded_once_judged_and_processes_can_split_a_seed_s_pair(first_run, tmp_path, monkeypatch):
    shutil.copy(first_run / "data.npz", tmp_path)
    records = tmp_path / "records"
    real_train = bench.train_score_langevin.main

    def killed_at_the_aligned_model(args):
        if args.align_expert:
            raise KeyboardInterrupt("the machine went away")
        real_train(args)

    monkeypatch.setattr(bench.train_score_langevin, "main", killed_at_the_aligned_model)
    with pytest.raises(KeyboardInterrupt):
        bench.main(bench_args(tmp_path, "--records", str(records)))
    assert [p.name for p in records.iterdir()] == ["baseline-seed0.json"]  # judged before the next model began

    monkeypatch.setattr(bench.train_score_langevin, "main", real_train)
    trained = []
    real_model = bench.train
    monkeypatch.setattr(bench, "train", lambda *a: trained.append(a[2]) or real_model(*a))
    bench.main(bench_args(tmp_path, "--records", str(records), "--variants", "aligned"))
    assert trained == ["aligned"] and json.loads((tmp_path / "out" / "results.json").read_text())["paired"] == []
    bench.main(bench_args(tmp_path, "--records", str(records)))  # the pair, both read back
    assert trained == ["aligned"]
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["paired"]) == 1


def test_alignment_strength_measures_the_score_script_s_term_per_band(first_run):
    out = first_run / "out"
    common = ["--data", str(first_run / "data.npz"), "--resolution", "16", "--expert", str(out / "expert"),
              "--unet", str(out / "baseline-seed0" / "unet"), "--bands", "4", "--batches", "1"]
    single, double = (strength.measure(strength.parse_args([*common, "--align-weight", weight]))
                      for weight in ("0.1", "0.2"))
    assert [band.sigma_max for band in single] == sorted(band.sigma_max for band in single)[::-1]  # largest first
    assert any(band.band_weight > 0 for band in single) and any(band.band_weight == 0 for band in single)
    for one, two in zip(single, double):
        assert (one.dsm, one.distance, one.grad_dsm) == (two.dsm, two.distance, two.grad_dsm)  # same batches, noise
        assert two.grad_align == pytest.approx(2 * one.grad_align, rel=1e-5)  # the term is linear in the weight
        if one.band_weight == 0:  # where the expert is at chance, alignment does not act
            assert one.distance == one.grad_align == 0
        else:
            assert one.grad_align > 0 and -1 <= one.cosine <= 1
