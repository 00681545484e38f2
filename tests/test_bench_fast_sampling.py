"""benchmarks/bench_fast_sampling.py: a grid stopped part-way resumes from its --output file, measuring only the runs
that are not in it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medsyn.pipelines import ClassConditionalDDPMPipeline
from medsyn.schedulers import AnnealedLangevinScheduler

from .conftest import get_dummy_pipeline
from .test_rlhf_generator_updates import tiny_ddpm

SPEC = importlib.util.spec_from_file_location(
    "bench_fast_sampling", Path(__file__).parents[1] / "benchmarks" / "bench_fast_sampling.py")
bench_fast_sampling = sys.modules["bench_fast_sampling"] = importlib.util.module_from_spec(SPEC)  # for @dataclass
SPEC.loader.exec_module(bench_fast_sampling)


@pytest.fixture
def setup(tmp_path):
    """A tiny 8 px DDPM of two classes (dark, bright) and two real splits of flat images."""
    tiny_ddpm().save_pretrained(tmp_path / "ddpm")
    rng = np.random.default_rng(0)
    for split, count in (("training", 64), ("testing", 32)):
        labels = np.arange(count) % 2
        images = (np.where(labels, 200, 40)[:, None, None] + rng.integers(0, 30, (count, 8, 8))).astype(np.uint8)
        np.savez(tmp_path / f"{split}.npz", images=images, labels=labels, class_names=np.array(["dark", "bright"]))
    return tmp_path


def bench(monkeypatch, folder, *extra):
    monkeypatch.setattr(sys, "argv", [
        "bench_fast_sampling.py", "--model", str(folder / "ddpm"), "--real-train", str(folder / "training.npz"),
        "--real-test", str(folder / "testing.npz"), "--per-class", "2", "--nfe", "10", "20", "--samplers", "DDIM",
        "--output", str(folder / "runs.jsonl"), *extra])
    bench_fast_sampling.main()


def sampled_steps(monkeypatch) -> list:
    calls = []
    original = ClassConditionalDDPMPipeline.__call__

    def counting(self, *args, **kwargs):
        calls.append(kwargs["num_inference_steps"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ClassConditionalDDPMPipeline, "__call__", counting)
    return calls


def table_rows(text: str) -> list[list[str]]:
    """The table's rows without images/s (a rerun's own timing)."""
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| DDPM")]
    return [cells[:5] + cells[6:] for cells in rows]


def test_a_stopped_grid_resumes_with_only_the_missing_runs(setup, monkeypatch, capsys):
    calls = sampled_steps(monkeypatch)
    bench(monkeypatch, setup)
    whole = table_rows(capsys.readouterr().out)
    assert calls == [5, 10] and len(whole) == 2
    runs = (setup / "runs.jsonl").read_text().splitlines()
    assert [json.loads(r)["steps"] for r in runs] == [5, 10]

    # a kill during the second run's write: its line is torn, the first run's kept
    (setup / "runs.jsonl").write_text(runs[0] + "\n" + runs[1][: len(runs[1]) // 2])
    calls.clear()
    bench(monkeypatch, setup)
    assert calls == [10] and table_rows(capsys.readouterr().out) == whole  # DDIM is deterministic: the same rows
    lines = (setup / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["steps"] == 10  # the new run on a line of its own

    calls.clear()
    bench(monkeypatch, setup)
    assert calls == [] and table_rows(capsys.readouterr().out) == whole
    bench(monkeypatch, setup, "--guidance", "2")  # another measurement: run again
    assert calls == [5, 10]


def test_real_features_are_cached_by_their_pixels(tmp_path):
    """The held-out set's features are computed once and read back on resume; other pixels (or another shape of the
    same bytes) are computed anew, and nothing half-written is left."""
    calls = []

    def compute(images):
        calls.append(images.shape)
        return torch.from_numpy(images.reshape(len(images), -1).astype(np.float64).mean(1, keepdims=True))

    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    first = bench_fast_sampling.cached_features(compute, images, str(tmp_path / "cache"))
    again = bench_fast_sampling.cached_features(compute, images.copy(), str(tmp_path / "cache"))
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    assert calls == [(2, 4, 4)]
    bench_fast_sampling.cached_features(compute, images.reshape(4, 2, 4), str(tmp_path / "cache"))
    bench_fast_sampling.cached_features(compute, images + 1, str(tmp_path / "cache"))
    assert calls == [(2, 4, 4), (4, 2, 4), (2, 4, 4)]
    assert len(list((tmp_path / "cache").iterdir())) == 3  # one file per set of pixels, no temporary left


def test_langevin_cut_to_a_budget_keeps_within_it_and_re_derives_its_step_size():
    pipe = get_dummy_pipeline()
    trained = AnnealedLangevinScheduler.from_config(pipe.scheduler.config, n_steps_each=6).config  # 4 levels x 6
    for budget in (10, 20, 35, 50, 100):
        (setting,) = [s for s in bench_fast_sampling.score_settings(trained, [budget], False)
                      if s.sampler == bench_fast_sampling.SHORT_LANGEVIN]
        pipe.scheduler = setting.scheduler
        nfe = bench_fast_sampling.evaluations_per_image(pipe, setting)
        levels = pipe.scheduler.num_inference_steps
        assert budget - 2 <= nfe <= budget and nfe == 2 * (2 * levels + 1)  # L levels x 2 steps + 1, guided
        assert pipe.scheduler.n_steps_each == 2 and pipe.scheduler.step_size != trained.step_size


def test_an_edm_model_is_sampled_by_the_ode_and_sde_samplers_only():
    """An EDM-trained score model has no ladder of levels to anneal over: no Langevin rows, every other sampler
    within its budget."""
    from medsyn.schedulers import EDMHeunScheduler

    config = EDMHeunScheduler(sigma_max=80.0, sigma_min=0.002).config
    settings = bench_fast_sampling.score_settings(config, [20, 48], True)
    names = {s.sampler for s in settings}
    assert not any("Langevin" in name for name in names)
    assert {"EDM Heun, deterministic", "EDM Heun, S_churn 40", "DPM-Solver++ 2M (diffusers EDM)"} <= names
    pipe = get_dummy_pipeline()
    for setting in settings:
        pipe.scheduler = setting.scheduler
        assert bench_fast_sampling.evaluations_per_image(pipe, setting) <= 48
