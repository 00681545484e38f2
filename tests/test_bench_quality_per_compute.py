"""benchmarks/bench_quality_per_compute.py: the held-out split comes from the training split, each arm trains
through its budgets in stages that resume, and the report joins evaluations with training records."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

SPEC = importlib.util.spec_from_file_location(
    "bench_quality_per_compute", Path(__file__).parents[1] / "benchmarks" / "bench_quality_per_compute.py")
bench = sys.modules["bench_quality_per_compute"] = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_arms_train_in_resumable_stages_and_the_report_joins_the_records(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(bench, "RECORDS", tmp_path / "records")
    # train sets the benchmark's one thread: keep it from this test process, whose later tests compare with
    # subprocesses bit for bit at the default thread count
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", images=rng.integers(0, 256, (60, 32, 32), dtype=np.uint8),
             labels=np.repeat([0, 1], 30), class_names=np.array(["healthy", "tumor"]),
             split=np.array(["training"] * 50 + ["testing"] * 10))
    out = tmp_path / "runs"
    bench.main(["prepare", "--data", str(tmp_path / "data.npz"), "--held-out", "20", "--output-dir", str(out)])
    with np.load(out / "train.npz") as train, np.load(out / "held_out.npz") as held:
        assert len(train["images"]) == 30 and len(held["images"]) == 20  # the test split is never used
    split = json.loads((out / "split.json").read_text())
    assert all(i < 50 for i in split["held_out_indices"])

    argv = ["train", "--arm", "edm", "--budgets", "2", "4", "--name", "tiny", "--output-dir", str(out)]
    bench.main(argv)
    first = json.loads((tmp_path / "records" / "tiny" / "edm-steps-2.json").read_text())
    second = json.loads((tmp_path / "records" / "tiny" / "edm-steps-4.json").read_text())
    assert second["training_seconds"] > first["training_seconds"] > 0
    assert "--preconditioning edm" in second["script"] and "--max_train_steps 4" in second["script"]
    assert (out / "edm" / "steps-2" / "model_index.json").is_file()
    assert not list((out / "edm" / "steps-4").glob("checkpoint-*"))
    capsys.readouterr()
    bench.main(argv)  # both budgets are there: nothing is trained again
    assert capsys.readouterr().out.count("already trained") == 2

    line = {"model": str(out / "edm" / "steps-4"), "sampler": "EDM Heun, deterministic", "nfe": 34, "fid": 12.5,
            "agreement": {"healthy": 0.5, "tumor": 0.75}}
    (tmp_path / "records" / "tiny" / "eval-edm.jsonl").write_text(json.dumps(line) + "\n")
    bench.main(["report", "--name", "tiny", "--figures", str(tmp_path / "figures")])
    table = capsys.readouterr().out
    row = f"| edm | 4 | {second['training_seconds']:.0f} | EDM Heun, deterministic | 34 | 12.5 | 0.50 / 0.75 |"
    assert row in table
    assert (tmp_path / "figures" / "quality_per_compute_tiny.png").is_file()
